"""Pipelines: chains of the library's stages that resume (the demo and `histodistill distill`)."""
