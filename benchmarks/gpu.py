"""GPU figures in one short script (about 5 minutes on one H100/H200): what bf16 and torch.compile buy,
the SD-MAE ViT-S/16 training step and its MFU, and extraction tiles/s against model-only.

    python -m benchmarks.gpu            # writes docs/benchmarks/gpu.md (and docs/benchmarks/extract.md)

1. Inference throughput (images/s, batch 256, 224 px) of ViT-S/16 and ResNet-50, the extractor shapes,
   in fp32, bf16 autocast, and bf16 + `torch.compile`; ratios against fp32 measured in the same run.
2. Training step of MAE and SD-MAE around the same ViT-S/16 encoder (bf16, compiled objective, fused
   AdamW): images/s, TFLOP/s from PyTorch's FLOP counter, MFU against the card's dense bf16 peak.
3. `benchmarks/extract.py` on the GPU (bf16, 8 workers, 4096 tiles of the sample slide): end-to-end
   extraction tiles/s over model-only on the same batches.

On a machine without a CUDA GPU it prints one line saying so and exits 0 without writing anything.
"""

from __future__ import annotations

import subprocess
import sys
import time

import torch

from benchmarks.common import ROOT, markdown_table, median_seconds, write_section

# Peak dense bf16 tensor throughput, for MFU (vendor figures, without sparsity).
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12}
BATCH = 256


def inference_rows(device: torch.device) -> list[list[object]]:
    """images/s of fp32, bf16 and bf16 + compile per model, each with its ratio to fp32."""
    import timm

    rows = []
    images = torch.randn(BATCH, 3, 224, 224, device=device)
    for name in ("vit_small_patch16_224", "resnet50"):
        # random: speed only
        model = timm.create_model(name, pretrained=False, num_classes=0).to(device).eval()
        compiled = torch.compile(model)
        variants = {"fp32": (model, False), "bf16": (model, True), "bf16 + compile": (compiled, True)}
        rates = {}
        for label, (net, bf16) in variants.items():

            def forward(net=net, bf16=bf16) -> None:
                with torch.inference_mode(), torch.autocast("cuda", torch.bfloat16, enabled=bf16):
                    net(images)

            rates[label] = BATCH / median_seconds(forward, repeats=10, warmup=3, sync=True)
        rows += [[name, label, f"{rate:.0f}", f"{rate / rates['fp32']:.2f}"] for label, rate in rates.items()]
    return rows


def sdmae_step_rows(device: torch.device, batch_size: int = BATCH) -> list[list[object]]:
    """MAE and SD-MAE training steps at the paper's size: images/s, TFLOP/s, MFU."""
    from torch.utils.flop_counter import FlopCounterMode

    from benchmarks.sdmae import paper_pair
    from histodistill.optim.optimizer import parameter_groups

    name = torch.cuda.get_device_name(0)
    peak = next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)
    rows = []
    for module in paper_pair():
        module = module.to(device)
        images = torch.randn(batch_size, 3, 224, 224, device=device)
        optimizer = torch.optim.AdamW(parameter_groups(module, 0.05), lr=1e-4, fused=True)
        with FlopCounterMode(display=False) as counter, torch.autocast("cuda", torch.bfloat16):
            module.objective((images, None))["loss"].backward()
        flops = counter.get_total_flops()
        compiled = torch.compile(module.objective)

        def step(compiled=compiled, images=images, optimizer=optimizer) -> None:
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast("cuda", torch.bfloat16):
                loss = compiled((images, None))["loss"]
            loss.backward()
            optimizer.step()

        seconds = median_seconds(step, repeats=10, warmup=3, sync=True)
        mfu = f"{flops / seconds / peak:.1%}" if peak else "n/a (unknown peak)"
        rows.append(
            [
                type(module).__name__,
                batch_size,
                f"{seconds * 1e3:.0f}",
                f"{batch_size / seconds:.0f}",
                f"{flops / seconds / 1e12:.1f}",
                mfu,
            ]
        )
    return rows


def main() -> int:
    if not torch.cuda.is_available():
        print(
            "benchmarks/gpu.py: no CUDA GPU visible on this machine; nothing measured, nothing written "
            "(docs/benchmarks/gpu.md keeps its 'not yet measured' note)"
        )
        return 0
    start = time.perf_counter()
    device = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32: the bf16 ratio is against true fp32
    inference = markdown_table(["model", "precision", "images/s", "× fp32"], inference_rows(device))
    steps = markdown_table(
        ["method", "batch", "ms / step", "images/s", "TFLOP/s", "MFU"], sdmae_step_rows(device)
    )
    extract = subprocess.call(
        [
            sys.executable,
            "-m",
            "benchmarks.extract",
            "--device",
            "cuda",
            "--precision",
            "bf16",
            "--workers",
            "8",
            "--batch-size",
            "256",
            "--tiles",
            "4096",
        ],
        cwd=ROOT,
    )
    body = f"""
### Inference throughput: what bf16 and torch.compile buy (batch {BATCH}, 224 px, random weights)

{inference}

### SD-MAE training step (ViT-S/16 at 224, mask 0.75, 4×192 decoder; bf16 autocast, compiled objective, \
fused AdamW)

{steps}

MFU = model FLOPs (PyTorch's FLOP counter on one forward + backward) / step time / the card's dense bf16
peak. Extraction tiles/s against model-only: the extraction section (`docs/benchmarks/extract.md`, {
        "written by this run" if extract == 0 else "its run FAILED in this session, see the console"
    }). Total time: {time.perf_counter() - start:.0f} s.
"""
    write_section("gpu", "GPU throughput: bf16, torch.compile, SD-MAE step and MFU", body)
    return extract


if __name__ == "__main__":
    sys.exit(main())
