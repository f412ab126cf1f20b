"""Whole-slide reading, tissue detection, tiling, sample data and datasets."""
