"""Drift: reference profiles built from training data, streaming sketches, and the recorder that
compares live traffic with them (docs/drift.md)."""
