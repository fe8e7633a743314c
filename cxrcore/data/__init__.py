"""Data: the raw Kaggle layout, synthetic phantoms, Ray Data ingest and the shared transforms."""
