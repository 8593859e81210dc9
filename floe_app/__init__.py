"""Floe: a terminal assistant on a small local model that keeps learning from its user."""

__version__ = "0.1.0"
