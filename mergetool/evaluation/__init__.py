"""Evaluation: task data, metrics, evaluators and caches."""
