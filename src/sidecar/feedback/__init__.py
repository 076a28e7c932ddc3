"""Ground truth: the prediction log, labels posted to /feedback, and the metrics they yield
(docs/ground-truth.md)."""
