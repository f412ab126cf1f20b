"""SD-MAE and MAE: what self-distillation costs, what masking saves, and what a short pretraining buys.

    python -m benchmarks.sdmae                          # the issue's budget: 3000 steps x 3 seeds
    python -m benchmarks.sdmae --steps 1000 --seeds 1   # what fits a busy 2-core CPU

1. Training-step time of SD-MAE over MAE with the same ViT-S/16 encoder and SD-MAE's decoder
   (so the ratio is the price of the two DINO heads and the distillation term).
2. Encoder forward time on 25 % visible tokens over a full pass (MAE's claimed saving).
3. The curve of probe balanced accuracy (linear and kNN) on the hgsc nuclei task (real H&E, spatial
   split) against pretraining steps, for a small ViT pretrained with MAE and with SD-MAE on random
   64-px crops of every sample image (thousands of crops, flips and turns; no labels), step 0 being
   the shared random init; mean ± sd over seeds.
GPU figures (bf16, torch.compile, images/s, MFU) are in `benchmarks/gpu.py`.
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


def step_fn(module, batch, optimizer):
    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        module.objective(batch)["loss"].backward()
        optimizer.step()

    return step


def paper_pair(**common):
    """MAE and SD-MAE around the same ViT-S/16 encoder and SD-MAE's 4×192 decoder."""
    decoder = {"decoder_dim": 192, "decoder_depth": 4, "decoder_heads": 3}
    encoder = {
        "backbone": "vit_small_patch16_224",
        "backbone_kwargs": {"class_token": False, "global_pool": "avg", "fc_norm": False},
    }
    return MAE(**encoder, **decoder, **common), SDMAE(**encoder, **decoder, **common)


def interleaved_ratio(numerator, denominator, repeats: int) -> tuple[float, float, float]:
    """Median of per-pair time ratios, the two functions timed alternately, so load from other processes
    (this machine is shared) hits both sides of each ratio alike. Returns (ratio, median numerator s,
    median denominator s)."""
    numerator(), denominator()  # warm-up
    pairs = [(median_seconds(numerator, 1, 0), median_seconds(denominator, 1, 0)) for _ in range(repeats)]
    ratios = sorted(a / b for a, b in pairs)
    return (
        ratios[len(ratios) // 2],
        float(np.median([a for a, _ in pairs])),
        float(np.median([b for _, b in pairs])),
    )


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
        return interleaved_ratio(
            lambda: encode_visible(vit, images, ids_keep), lambda: vit.forward_features(images), repeats
        )


# ---- quality on the nuclei task --------------------------------------------------------------------
SMALL_VIT = {
    "backbone": "tiny/vit-tiny-p8-64",
    "backbone_kwargs": {"embed_dim": 96, "depth": 4, "num_heads": 3},
}
SMALL_DECODER = {"decoder_dim": 64, "decoder_depth": 2, "decoder_heads": 2}


def to_input(crops: np.ndarray, preprocess) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> (N, 3, H, W) normalised with the backbone's mean/std."""
    x = torch.from_numpy(crops).permute(0, 3, 1, 2).float() / 255
    mean = torch.tensor(preprocess.mean).view(1, 3, 1, 1)
    std = torch.tensor(preprocess.std).view(1, 3, 1, 1)
    return (x - mean) / std


PRETRAIN_SAMPLES = ("cmu_small_region", "hgsc_nest", "hgsc_stromal_he", "tiatoolbox_target")


def pretraining_crops(n: int, size: int = 64, seed: int = 0) -> np.ndarray:
    """(n, size, size, 3) uint8: random crops with at least half tissue, spread evenly over every sample
    image (unlabeled; the nuclei task's test side of hgsc_nest is among them, as in any SSL on a cohort)."""
    from histodistill.samples.registry import fetch
    from histodistill.samples.stain_norm import TISSUE_LIGHTNESS, rgb_to_lab
    from histodistill.samples.synthetic_slides import crop_fraction
    from histodistill.wsi.slide import open_slide

    rng = np.random.default_rng(seed)
    crops = []
    for i, name in enumerate(PRETRAIN_SAMPLES):
        slide = open_slide(fetch(name), mpp=0.5)
        image = slide.read_region((0, 0), 0, slide.dimensions)
        # (M, 2) (y, x)
        ok = np.argwhere(crop_fraction(rgb_to_lab(image)[..., 0] < TISSUE_LIGHTNESS, size) >= 0.5)
        share = n // len(PRETRAIN_SAMPLES) + (i < n % len(PRETRAIN_SAMPLES))
        crops += [image[y : y + size, x : x + size] for y, x in ok[rng.integers(len(ok), size=share)]]
    return np.stack(crops)


def pretrain(
    module,
    crops: np.ndarray,
    steps: range,
    batch_size: int,
    total: int,
    generator: torch.Generator,
    optimizer,
    schedule,
) -> None:
    """Run ``steps`` of AdamW (warm-up + cosine over ``total`` steps) on batches of random crops from
    ``crops`` (N, 64, 64, 3) uint8, each batch flipped and turned at random."""
    module.train()
    for _ in steps:
        idx = torch.randint(len(crops), (batch_size,), generator=generator)
        batch = to_input(crops[idx.numpy()], module.preprocess)
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


def probe_balanced_accuracy(train_x, train_y, test_x, test_y, num_classes: int) -> tuple[float, float]:
    """(linear, kNN) balanced accuracy: standardised features; logistic regression (class-balanced) and a
    20-nearest-neighbour vote (cosine, distance-weighted, as DINO's kNN probe)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.preprocessing import StandardScaler

    from histodistill.eval.metrics import classification_metrics

    scaler = StandardScaler().fit(train_x)
    train_x, test_x = scaler.transform(train_x), scaler.transform(test_x)
    linear = LogisticRegression(max_iter=3000, class_weight="balanced").fit(train_x, train_y)
    knn = KNeighborsClassifier(20, metric="cosine", weights="distance").fit(train_x, train_y)
    return tuple(
        classification_metrics(test_y, clf.predict_proba(test_x), num_classes)["balanced_accuracy"]
        for clf in (linear, knn)
    )


def warmup_cosine(total: int):
    """Learning-rate factor per step: linear warm-up over the first tenth, then cosine to 0 at ``total``."""
    warmup = max(1, total // 10)
    return lambda s: min(
        (s + 1) / warmup, 0.5 * (1 + np.cos(np.pi * min(1.0, (s - warmup) / max(1, total - warmup))))
    )


def quality(steps: int, eval_at: list[int], seeds: int, batch_size: int, n_crops: int) -> tuple[dict, str]:
    """``{(method, step): [(linear, knn) per seed]}``; step 0 is the random init both methods share."""
    from histodistill.samples.nuclei import load_nuclei_task

    task = load_nuclei_task(crop_size=64)
    crops = pretraining_crops(n_crops)
    results: dict[tuple[str, int], list[tuple[float, float]]] = {}
    for seed in range(seeds):
        for name in ("MAE", "SD-MAE"):
            torch.manual_seed(seed)  # the encoder is built first: same random init for both methods
            if name == "SD-MAE":
                module = SDMAE(
                    **SMALL_VIT, **SMALL_DECODER, head_dim=1024, head_hidden_dim=512, head_bottleneck_dim=128
                )
            else:
                module = MAE(**SMALL_VIT, **SMALL_DECODER)
            train, test = (
                to_input(task.train_images, module.preprocess),
                to_input(task.test_images, module.preprocess),
            )
            generator = torch.Generator().manual_seed(seed)
            optimizer = torch.optim.AdamW(parameter_groups(module, 0.05), lr=1.5e-3, betas=(0.9, 0.95))
            schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(steps))
            done = 0
            for at in sorted({0, *eval_at}):
                pretrain(module, crops, range(done, at), batch_size, steps, generator, optimizer, schedule)
                done = at
                acc = probe_balanced_accuracy(
                    features(module.backbone, train),
                    task.train_labels,
                    features(module.backbone, test),
                    task.test_labels,
                    len(task.class_names),
                )
                results.setdefault(("random init" if at == 0 else name, at), []).append(acc)
                print(f"seed {seed} {name} step {at}: linear {acc[0]:.3f}, kNN {acc[1]:.3f}", flush=True)
    counts = (
        f"{len(crops)} unlabeled pretraining crops from {', '.join(PRETRAIN_SAMPLES)}; probe on "
        f"{len(task.train_labels)} train / {len(task.test_labels)} test nuclei, classes "
        f"{', '.join(task.class_names)}"
    )
    return results, counts


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--batch-size", type=int, default=4, help="batch of the CPU timing runs (ViT-S/16 at 224)"
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed pairs per ratio (median reported)")
    parser.add_argument(
        "--steps", type=int, default=3000, help="pretraining steps per run in the quality curve"
    )
    parser.add_argument(
        "--eval-at",
        default=None,
        help="comma-separated steps at which to probe (default: 0, 1/6, 1/3, 2/3 and all of --steps)",
    )
    parser.add_argument("--seeds", type=int, default=3, help="seeds in the quality curve (mean ± sd)")
    parser.add_argument(
        "--pretrain-batch", type=int, default=32, help="batch size of the quality pretraining"
    )
    parser.add_argument("--crops", type=int, default=8000, help="unlabeled 64-px pretraining crops")
    parser.add_argument("--skip-cost", action="store_true", help="only the quality curve")
    args = parser.parse_args()
    start = time.perf_counter()
    eval_at = (
        [int(v) for v in args.eval_at.split(",")]
        if args.eval_at
        else sorted({0, args.steps // 6, args.steps // 3, 2 * args.steps // 3, args.steps})
    )

    body = ""
    if not args.skip_cost:
        step_ratio, sdmae_s, mae_s = step_time_ratio(args.batch_size, args.repeats)
        encoder_ratio_, masked_s, full_s = encoder_ratio(args.batch_size, args.repeats)
        body += f"""
### Cost (CPU, ViT-S/16 at 224, batch {args.batch_size}, mask 0.75, median of {args.repeats} interleaved \
pairs)

| measure | value | target |
|---|---|---|
| SD-MAE step / MAE step (same encoder, same 4×192 decoder; the difference is the two 4096-way DINO heads) | \
{step_ratio:.2f} ({sdmae_s:.2f} s / {mae_s:.2f} s) | ≤ 1.15 |
| encoder on 25 % visible tokens / full pass | {encoder_ratio_:.2f} ({masked_s * 1e3:.0f} ms / \
{full_s * 1e3:.0f} ms) | ≤ 0.4 |
"""
    results, counts = quality(args.steps, eval_at, args.seeds, args.pretrain_batch, args.crops)
    rows = [
        [name, step, mean_sd([v[0] for v in values]), mean_sd([v[1] for v in values]), len(values)]
        for (name, step), values in sorted(results.items(), key=lambda item: (item[0][1], item[0][0]))
    ]
    final = {name: np.mean([v[0] for v in results[(name, args.steps)]]) for name in ("MAE", "SD-MAE")}
    verdict = ("SD-MAE beats MAE" if final["SD-MAE"] > final["MAE"] else "SD-MAE does NOT beat MAE") + (
        f" on the final linear probe here ({final['SD-MAE']:.3f} vs {final['MAE']:.3f}, mean of {args.seeds} "
        "seed(s))"
    )
    body += f"""
### Quality: probe accuracy against pretraining steps (hgsc nuclei task)

A 4-block, 96-d ViT with 8-px patches at 64 px, pretrained for {args.steps} steps (batch \
{args.pretrain_batch},
AdamW lr 1.5e-3, warm-up + cosine, flips and 90° turns) with MAE or SD-MAE; {counts}; spatial split.
Frozen pooled features (SD-MAE: mean of normed tokens; MAE: cls token) → standardised → a class-balanced
logistic regression (linear) and a 20-NN cosine vote (kNN). Balanced accuracy, mean ± sd over seeds; step 0 is
the random init both methods start from.

{markdown_table(["encoder", "step", "linear probe", "kNN probe", "seeds"], rows)}

{verdict}. This is CPU pretraining of a tiny ViT on a few thousand crops of four images, not the paper's
100 epochs on 100,000 patches. Total time of this benchmark: {time.perf_counter() - start:.0f} s.
"""
    write_section("sdmae", "SD-MAE and MAE pretraining", body)


if __name__ == "__main__":
    main()
