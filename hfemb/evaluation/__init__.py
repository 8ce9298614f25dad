"""Evaluation: encoders, embedding cache, metrics, threshold sweeps, reports, classification."""
