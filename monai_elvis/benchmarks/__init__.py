"""Benchmarks that print figures: ``python -m monai_elvis.benchmarks {losses} [--json]``."""
