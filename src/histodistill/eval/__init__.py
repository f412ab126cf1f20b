"""Evaluation: feature extraction, probes, metrics, heatmaps, reports."""
