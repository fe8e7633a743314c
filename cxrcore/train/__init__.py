"""Distributed training with Ray Train: the worker loop, the epoch engine and the driver."""
