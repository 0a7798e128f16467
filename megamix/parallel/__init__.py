"""Parallelism applied to a finished single-device model from outside (tensor, pipeline, data)."""
