"""Datasets: the sources ``prepare`` reads and the prepared dataset every later stage reads."""
