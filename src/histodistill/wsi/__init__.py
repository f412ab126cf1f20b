"""Whole-slide images: reading (OpenSlide/TiffSlide/plain images), tissue detection, tiling, the pyramidal
TIFF writer."""
