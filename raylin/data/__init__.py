"""Data sets and shipped assets."""
