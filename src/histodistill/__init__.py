"""histodistill: small, strong feature extractors for histopathology, proven on whole slides."""

__version__ = "0.1.0"
