class SoftMatchingResult:  # placeholder
    pass
