"""cxr: train, compare and serve chest X-ray classifiers on a Ray cluster."""

__version__ = "0.2.0"
