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
from typing import TYPE_CHECKING, Any

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

# The same names for type checkers (py.typed; ``X as X`` marks a re-export); at run time `__getattr__` imports
# each on first use. tests/test_layers.py checks that this block and `_PUBLIC` agree.
if TYPE_CHECKING:
    from histodistill.errors import UserError as UserError
    from histodistill.eval.mil_cv import CVConfig as CVConfig
    from histodistill.eval.mil_cv import cross_validate as cross_validate
    from histodistill.eval.probe import evaluate_probes as evaluate_probes
    from histodistill.features.export import export_checkpoint as export_checkpoint
    from histodistill.features.extract import extract_images as extract_images
    from histodistill.features.extract import extract_slides as extract_slides
    from histodistill.models.backbones import Backbone as Backbone
    from histodistill.models.backbones import create_backbone as create_backbone
    from histodistill.models.backbones import list_backbones as list_backbones
    from histodistill.models.mil import create_mil as create_mil
    from histodistill.wsi.coords import read_coords as read_coords
    from histodistill.wsi.slide import Slide as Slide
    from histodistill.wsi.slide import open_slide as open_slide
    from histodistill.wsi.tiling import tile_slide as tile_slide
    from histodistill.wsi.tissue import TissueConfig as TissueConfig
    from histodistill.wsi.tissue import tissue_mask as tissue_mask


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module 'histodistill' has no attribute {name!r}")
    value = getattr(importlib.import_module(_PUBLIC[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
