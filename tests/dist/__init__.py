"""Helpers shared by the entry-point tests and the multi-process script run_dist.py."""
