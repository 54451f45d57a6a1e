"""Experiments built on advlab: `python -m advlab.experiments.retrieval` tests VILLA on real-data retrieval."""
