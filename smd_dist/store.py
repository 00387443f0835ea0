"""Placeholder: being written."""
class ActivationStore:  # replaced by the store developer
    pass
