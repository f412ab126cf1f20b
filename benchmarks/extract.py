"""Extraction throughput: tiles/s from a slide through the Dataset, DataLoader and model for 0, 1 and 2
DataLoader workers (`extract --workers`), each as a ratio of the model-only throughput on the very same
(pre-loaded) batches, measured in the same run.

A ratio near 1 means reading and preparing tiles is hidden behind the model; below 1, the data side is
the bottleneck. The runs are interleaved (model-only, then each worker count, repeated), so a busy
machine slows them alike; the table gives mean ± sd over the repeats. Runs on the real sample slide when
cached (`histodistill samples fetch cmu_small_region`), otherwise on the generated slide of
`benchmarks.tiling`, and says which.

    python -m benchmarks.extract [--model tiny/resnet18-64] [--device auto] [--workers 0 1 2] [--tiles 512]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import Subset

from benchmarks.common import markdown_table, mean_sd, write_section
from benchmarks.tiling import generated_slide


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="tiny/resnet18-64")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--tiles", type=int, default=512, help="at most this many tiles are timed")
    parser.add_argument(
        "--precision", choices=("32", "bf16"), default=None, help="default: bf16 on a GPU, 32 on the CPU"
    )
    args = parser.parse_args()

    from histodistill.data.slide_dataset import SlideTileDataset
    from histodistill.data.transforms import build_transform
    from histodistill.distributed import resolve_device
    from histodistill.features.extract import extract_slide, prepare_model
    from histodistill.models.backbones import create_backbone
    from histodistill.samples.registry import cached_path
    from histodistill.wsi.tiling import tile_slide

    device = resolve_device(args.device)
    precision = args.precision or ("bf16" if device.type == "cuda" else "32")
    torch.manual_seed(0)
    # speed does not depend on the weights
    backbone = prepare_model(create_backbone(args.model, pretrained=False), device)
    size = backbone.spec.preprocess.input_size
    with tempfile.TemporaryDirectory() as tmp:
        slide = cached_path("cmu_small_region")
        slide_label = "CMU-1-Small-Region (real Aperio SVS)" if slide else "generated 3072 px pyramidal TIFF"
        slide = slide or generated_slide(Path(tmp))
        tile_slide(slide, Path(tmp) / "tiles", target_mpp=0.5, patch_size=size)
        coords = next((Path(tmp) / "tiles" / "patches").glob("*.h5"))
        full = SlideTileDataset(
            coords, transform=build_transform("eval", backbone.spec.preprocess, train=False)
        )
        dataset = Subset(full, range(min(args.tiles, len(full))))

        def end_to_end(workers: int) -> float:
            start = time.perf_counter()
            extract_slide(backbone, dataset, args.batch_size, workers, device, precision, desc="benchmark")
            _sync(device)
            return len(dataset) / (time.perf_counter() - start)

        batches = [
            torch.stack([dataset[j][0] for j in range(i, min(i + args.batch_size, len(dataset)))])
            for i in range(0, len(dataset), args.batch_size)
        ]

        @torch.inference_mode()
        def model_only() -> float:
            autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
            start = time.perf_counter()
            for batch in batches:
                batch = batch.to(device, non_blocking=True)
                if device.type == "cuda":
                    batch = batch.contiguous(memory_format=torch.channels_last)
                with autocast:
                    backbone(batch).float().cpu()
            _sync(device)
            return len(dataset) / (time.perf_counter() - start)

        model_only()  # warm-up (allocator, cuDNN autotune)
        load_before = os.getloadavg()[0]
        alone, e2e = [], {workers: [] for workers in args.workers}
        for _ in range(args.repeats):
            alone.append(model_only())
            for workers in args.workers:
                e2e[workers].append(end_to_end(workers))
    rows = [
        [workers, mean_sd(rates), mean_sd([rate / model for rate, model in zip(rates, alone, strict=True)])]
        for workers, rates in e2e.items()
    ]
    table = markdown_table(["workers", "end-to-end tiles/s", "ratio to model-only"], rows)
    body = f"""
Slide: {slide_label}, tiled at 0.5 mpp into {size}-px tiles (the model's input size); {len(dataset)} tiles,
model {args.model}, {device.type}, precision {precision}, batch {args.batch_size}. End-to-end = \
`extract_slide`
over a `SlideTileDataset` (read, eval transform, DataLoader with N workers started for the slide, model);
model-only = the same batches already in memory: {mean_sd(alone)} tiles/s. Mean ± sd over {args.repeats}
interleaved repeats. Load average (1 min) {load_before:.1f} before and {os.getloadavg()[0]:.1f} after, on
{os.cpu_count()} cores: tiles/s depend on what else runs on the machine.

{table}

On a CPU the model and the DataLoader workers share the same few cores, so every tile decoded is compute taken
from the model: the ratio there measures that competition, not overlap, and more workers than free cores only
add start-up and scheduling. On a GPU the workers run beside the model and the target is a ratio of at least
0.9 (the data side hidden behind the \
model){"" if device.type == "cuda" else "; this run had no GPU, so that target is not measured here"}.
"""
    write_section("extract", "Feature extraction throughput", body)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


if __name__ == "__main__":
    main()
