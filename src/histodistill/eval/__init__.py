"""Evaluation: probes, metrics, MIL training and its outputs, heatmaps, the HTML report."""
