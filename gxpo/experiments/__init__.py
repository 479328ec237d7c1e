"""Experiments built on the trainer: method comparisons and their tables."""
