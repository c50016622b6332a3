"""Evaluation: task metrics, speed and memory, plots."""
