"""Parallelism, applied outside model code: the launch checks, and one Backend per strategy (select.py picks it)."""
