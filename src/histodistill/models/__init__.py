"""Backbones, the masked ViT and its decoder, heads, MIL models."""
