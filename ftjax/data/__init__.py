"""Data preparation and input pipelines."""
