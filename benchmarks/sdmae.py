"""SD-MAE and MAE: what self-distillation costs, what masking saves, and what a short pretraining buys.

    python -m benchmarks.sdmae            # CPU default: ~5-8 minutes on 2 cores
    python -m benchmarks.sdmae --steps 400 --seeds 5

1. Training-step time of SD-MAE over MAE with the same ViT-S/16 encoder and SD-MAE's decoder
   (so the ratio is the price of the two DINO heads and the distillation term).
2. Encoder forward time on 25 % visible tokens over a full pass (MAE's claimed saving).
3. Linear-probe balanced accuracy on the hgsc nuclei task (real H&E, spatial split) of a small ViT
   at random init vs pretrained briefly with MAE and with SD-MAE on the task's own crops (labels
   unused), mean ± sd over seeds.
4. On a GPU only: images/s and MFU of a bf16, torch.compile'd training step at the paper's size.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from benchmarks.common import markdown_table, mean_sd, median_seconds, write_section
from histodistill.methods.sdmae import MAE, SDMAE
from histodistill.models.vit_mae import encode_visible, random_masking
from histodistill.optim.optimizer import parameter_groups

# Peak dense bf16 tensor throughput, for MFU (vendor figures, without sparsity).
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def step_fn(module, batch, optimizer):
    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        module.objective(batch)["loss"].backward()
        optimizer.step()

    return step


def paper_pair(**common):
    """MAE and SD-MAE around the same ViT-S/16 encoder and SD-MAE's 4×192 decoder."""
    decoder = {"decoder_dim": 192, "decoder_depth": 4, "decoder_heads": 3}
    encoder = {"backbone": "vit_small_patch16_224", "backbone_kwargs": {"class_token": False, "global_pool": "avg",
                                                                         "fc_norm": False}}
    return MAE(**encoder, **decoder, **common), SDMAE(**encoder, **decoder, **common)


def interleaved_ratio(numerator, denominator, repeats: int) -> tuple[float, float, float]:
    """Median of per-pair time ratios, the two functions timed alternately, so load from other processes
    (this machine is shared) hits both sides of each ratio alike. Returns (ratio, median numerator s,
    median denominator s)."""
    numerator(), denominator()  # warm-up
    pairs = [(median_seconds(numerator, 1, 0), median_seconds(denominator, 1, 0)) for _ in range(repeats)]
    ratios = sorted(a / b for a, b in pairs)
    return ratios[len(ratios) // 2], float(np.median([a for a, _ in pairs])), float(np.median([b for _, b in pairs]))


def step_time_ratio(batch_size: int, repeats: int) -> tuple[float, float, float]:
    """SD-MAE step time over MAE step time."""
    torch.manual_seed(0)
    batch = (torch.randn(batch_size, 3, 224, 224), None)
    steps = [step_fn(m, batch, torch.optim.AdamW(parameter_groups(m, 0.05), lr=1e-4)) for m in paper_pair()]
    return interleaved_ratio(steps[1], steps[0], repeats)


def encoder_ratio(batch_size: int, repeats: int) -> tuple[float, float, float]:
    """Encoder forward on the visible quarter over a full forward."""
    vit = paper_pair()[1].backbone.model.eval()
    images = torch.randn(batch_size, 3, 224, 224)
    ids_keep = random_masking(batch_size, 196, 0.75).ids_keep
    with torch.no_grad():
        return interleaved_ratio(lambda: encode_visible(vit, images, ids_keep), lambda: vit.forward_features(images), repeats)


# ---- quality on the nuclei task --------------------------------------------------------------------
SMALL_VIT = {"backbone": "tiny/vit-tiny-p8-64", "backbone_kwargs": {"embed_dim": 96, "depth": 4, "num_heads": 3}}
SMALL_DECODER = {"decoder_dim": 64, "decoder_depth": 2, "decoder_heads": 2}


def to_input(crops: np.ndarray, preprocess) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> (N, 3, H, W) normalised with the backbone's mean/std."""
    x = torch.from_numpy(crops).permute(0, 3, 1, 2).float() / 255
    mean = torch.tensor(preprocess.mean).view(1, 3, 1, 1)
    std = torch.tensor(preprocess.std).view(1, 3, 1, 1)
    return (x - mean) / std


def pretrain(module, images: torch.Tensor, steps: int, batch_size: int, seed: int) -> None:
    """AdamW with warm-up + cosine, random flips/rotations as augmentation (crops are already 64 px)."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(parameter_groups(module, 0.05), lr=1.5e-3, betas=(0.9, 0.95))
    warmup = max(1, steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warmup, 0.5 * (1 + np.cos(np.pi * min(1.0, (s - warmup) / (steps - warmup)))))
    )
    module.train()
    for _ in range(steps):
        idx = torch.randint(len(images), (batch_size,), generator=generator)
        batch = images[idx]
        if torch.rand(1, generator=generator).item() < 0.5:
            batch = batch.flip(-1)
        batch = torch.rot90(batch, int(torch.randint(4, (1,), generator=generator)), dims=(-2, -1))
        optimizer.zero_grad(set_to_none=True)
        module.objective((batch, None))["loss"].backward()
        optimizer.step()
        schedule.step()


@torch.no_grad()
def features(backbone, images: torch.Tensor) -> np.ndarray:
    backbone.eval()
    return torch.cat([backbone(chunk) for chunk in images.split(128)]).numpy()


def probe_balanced_accuracy(train_x, train_y, test_x, test_y, num_classes: int) -> float:
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    from histodistill.eval.metrics import classification_metrics

    scaler = StandardScaler().fit(train_x)
    clf = LogisticRegression(max_iter=3000, class_weight="balanced").fit(scaler.transform(train_x), train_y)
    probs = clf.predict_proba(scaler.transform(test_x))
    return classification_metrics(test_y, probs, num_classes)["balanced_accuracy"]


def quality(steps: int, seeds: int, batch_size: int) -> tuple[dict[str, list[float]], str]:
    from histodistill.samples.nuclei import load_nuclei_task

    task = load_nuclei_task(crop_size=64)
    results: dict[str, list[float]] = {"random init": [], "MAE": [], "SD-MAE": []}
    for seed in range(seeds):
        for name in results:
            torch.manual_seed(seed)
            if name == "SD-MAE":
                module = SDMAE(**SMALL_VIT, **SMALL_DECODER, head_dim=1024, head_hidden_dim=512, head_bottleneck_dim=128)
            else:
                module = MAE(**SMALL_VIT, **SMALL_DECODER)
            pre = module.preprocess
            train, test = to_input(task.train_images, pre), to_input(task.test_images, pre)
            if name != "random init":
                pretrain(module, train, steps, batch_size, seed)
            acc = probe_balanced_accuracy(
                features(module.backbone, train), task.train_labels, features(module.backbone, test), task.test_labels,
                len(task.class_names),
            )
            results[name].append(acc)
            print(f"seed {seed} {name}: balanced accuracy {acc:.3f}", flush=True)
    counts = f"{len(task.train_labels)} train / {len(task.test_labels)} test crops, classes {', '.join(task.class_names)}"
    return results, counts


def gpu_section(batch_size: int, steps: int) -> str:
    from torch.utils.flop_counter import FlopCounterMode

    device = torch.device("cuda")
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

        seconds = median_seconds(step, repeats=steps, warmup=3, sync=True)
        mfu = f"{flops / seconds / peak:.1%}" if peak else "n/a"
        rows.append([type(module).__name__, batch_size, f"{batch_size / seconds:.0f}", f"{flops / seconds / 1e12:.1f}", mfu])
    return f"GPU: {name}, bf16 autocast, torch.compile, ViT-S/16 at 224, mask 0.75.\n\n" + markdown_table(
        ["method", "batch", "images/s", "TFLOP/s", "MFU"], rows
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=4, help="batch of the CPU timing runs (ViT-S/16 at 224)")
    parser.add_argument("--repeats", type=int, default=3, help="timed pairs per ratio (median reported)")
    parser.add_argument("--steps", type=int, default=400, help="pretraining steps per run in the quality test")
    parser.add_argument("--seeds", type=int, default=3, help="seeds in the quality test (mean ± sd)")
    parser.add_argument("--pretrain-batch", type=int, default=16, help="batch size of the quality pretraining")
    parser.add_argument("--gpu-batch", type=int, default=256, help="batch of the GPU throughput run")
    args = parser.parse_args()
    start = time.perf_counter()

    step_ratio, sdmae_s, mae_s = step_time_ratio(args.batch_size, args.repeats)
    encoder_ratio_, masked_s, full_s = encoder_ratio(args.batch_size, args.repeats)
    results, counts = quality(args.steps, args.seeds, args.pretrain_batch)
    baseline = results["random init"]
    rows = [[name, mean_sd(values), f"{np.mean(values) - np.mean(baseline):+.3f}"] for name, values in results.items()]

    body = f"""
### Cost (CPU, ViT-S/16 at 224, batch {args.batch_size}, mask 0.75, median of {args.repeats} interleaved pairs)

| measure | value | target |
|---|---|---|
| SD-MAE step / MAE step (same encoder, same 4×192 decoder; the difference is the two 4096-way DINO heads) | {step_ratio:.2f} ({sdmae_s:.2f} s / {mae_s:.2f} s) | ≤ 1.15 |
| encoder on 25 % visible tokens / full pass | {encoder_ratio_:.2f} ({masked_s * 1e3:.0f} ms / {full_s * 1e3:.0f} ms) | ≤ 0.4 |

### Quality: linear probe on the hgsc nuclei task

A 4-block, 96-d ViT with 8-px patches at 64 px, pretrained for {args.steps} steps (batch {args.pretrain_batch},
AdamW, warm-up + cosine) on the task's own training crops with their labels unused, then frozen; pooled
features (SD-MAE: mean of normed tokens; MAE: cls token) → standardised → logistic regression
(class-balanced). {counts}; spatial split. Balanced accuracy over {args.seeds} seeds:

{markdown_table(["encoder", "balanced accuracy", "Δ vs random init"], rows)}

This is minutes of CPU pretraining on under a thousand 64-px crops, not the paper's 100 epochs on
100,000 patches: it checks that pretraining moves the features in the right direction on real tissue,
not the paper's accuracy. Total time of this benchmark: {time.perf_counter() - start:.0f} s.
"""
    if torch.cuda.is_available():
        body += "\n### GPU throughput\n\n" + gpu_section(args.gpu_batch, steps=10) + "\n"
    else:
        body += "\n_No GPU in this run: the GPU section (bf16, torch.compile, images/s, MFU) was skipped._\n"
    write_section("sdmae", "SD-MAE and MAE pretraining", body)


if __name__ == "__main__":
    main()
