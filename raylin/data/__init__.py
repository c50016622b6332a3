"""Data sets: each task's examples, evaluation sets, corpora and their batches."""
