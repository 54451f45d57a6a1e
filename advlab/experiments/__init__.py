"""Experiments built on advlab: `python -m advlab.experiments.retrieval` reproduces VILLA's retrieval effect."""
