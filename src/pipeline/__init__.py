"""Deep-learning studies on BIDS datasets: ingest, preprocess, split, train, evaluate, explain, report."""

__version__ = "0.1.0"
