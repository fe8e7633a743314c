"""Evaluation output: plots of metrics and training curves, and the self-contained HTML report."""
