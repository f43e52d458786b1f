"""Sweeps: the validated spec, Ray Tune wiring and MLflow tracking."""
