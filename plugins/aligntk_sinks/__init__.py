"""Logging sinks: TensorBoard, Weights & Biases (offline), MLflow (local store) and CSV, off by default."""
