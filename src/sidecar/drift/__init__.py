"""Drift: reference profiles built from training data, streaming sketches, noise floors and
verdicts, and the recorder that compares live traffic with them (docs/drift.md)."""
