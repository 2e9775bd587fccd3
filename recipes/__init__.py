"""Recipes shipped with distrain: one module per training pipeline (see `distrain recipes`)."""
