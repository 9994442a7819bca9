"""Evaluation: metrics, scoring of whole datasets, the `virst eval` runner."""
