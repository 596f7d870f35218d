"""recray: train, tune, serve and A/B-test large ranking models on Ray."""

__version__ = "0.1.0"
