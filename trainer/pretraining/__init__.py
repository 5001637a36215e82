"""Pretraining: its config, inputs (corpora, loader), model building, the in-run probe, and the entry (train.py)."""
