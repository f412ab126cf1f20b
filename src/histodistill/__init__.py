"""histodistill: small, strong feature extractors for histopathology, proven on whole slides.

The stable surface for scripts is what this module exports; the subpackages' layout may change.

    import histodistill as hd
    slide = hd.open_slide("slide.svs")                       # Slide: mpp, levels, read_region
    hd.tile_slide("slide.svs", "runs/tiles", target_mpp=0.5, patch_size=256)
    backbone = hd.create_backbone("resnet50", pretrained=True)   # (B, 3, S, S) -> (B, D)
    hd.extract_slides("resnet50", "runs/tiles", "runs/features")

Names are imported on first use, so ``import histodistill`` (and ``histodistill --help``) does not
pull in torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it
_PUBLIC = {
    "Slide": "histodistill.wsi.slide",
    "open_slide": "histodistill.wsi.slide",
    "TissueConfig": "histodistill.wsi.tissue",
    "tissue_mask": "histodistill.wsi.tissue",
    "tile_slide": "histodistill.wsi.tiling",
    "read_coords": "histodistill.wsi.coords",
    "Backbone": "histodistill.models.backbones",
    "create_backbone": "histodistill.models.backbones",
    "list_backbones": "histodistill.models.backbones",
    "create_mil": "histodistill.models.mil",
    "extract_slides": "histodistill.features.extract",
    "extract_images": "histodistill.features.extract",
    "export_checkpoint": "histodistill.features.export",
    "evaluate_probes": "histodistill.eval.probe",
    "CVConfig": "histodistill.eval.mil_cv",
    "cross_validate": "histodistill.eval.mil_cv",
    "UserError": "histodistill.errors",
}

__all__ = ["__version__", *_PUBLIC]


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module 'histodistill' has no attribute {name!r}")
    value = getattr(importlib.import_module(_PUBLIC[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
