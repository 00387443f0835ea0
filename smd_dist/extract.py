"""Placeholder: being written."""
def extract(*a, **k): raise NotImplementedError
