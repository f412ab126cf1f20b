"""The MCM-KD method: shapes, gradients, the masking it applies, and that fine-tuning lowers the loss."""

from __future__ import annotations

import csv
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from histodistill.methods.mcmkd import MCMKD

SIDE, TILE, DIM = 3, 32, 6


def fake_batch(batch_size: int = 4, seed: int = 0):
    """Windows whose teacher feature of each cell is a fixed function of that cell's mean colour."""
    g = torch.Generator().manual_seed(seed)
    colours = torch.rand(batch_size, SIDE * SIDE, 3, generator=g)  # (B, S, 3)
    grid = colours.transpose(1, 2).reshape(batch_size, 3, SIDE, SIDE)
    windows = grid.repeat_interleave(TILE, dim=2).repeat_interleave(TILE, dim=3)  # (B, 3, P, P)
    windows = windows + 0.05 * torch.randn(windows.shape, generator=g)
    teacher = torch.cat([colours, colours**2], dim=-1)  # (B, S, 6)
    valid = torch.ones(batch_size, SIDE * SIDE, dtype=torch.bool)
    valid[0, 0] = False
    cells = torch.zeros(batch_size, SIDE * SIDE, 2, dtype=torch.long)
    return windows, cells, valid, teacher


def make(**kwargs) -> MCMKD:
    torch.manual_seed(0)
    return MCMKD(student="test_resnet", teacher_dim=DIM, pretrained=False, **kwargs)


@pytest.mark.parametrize(
    ("fill", "head", "loss"), [("mean", "linear", "cosine"), ("learned", "mlp", "smooth_l1")]
)
def test_objective_is_finite_and_reaches_every_trainable_part(fill, head, loss):
    model = make(fill=fill, head=head, loss=loss)
    losses = model.objective(fake_batch())
    assert set(losses) == {"loss", "masked", "visible"} and all(torch.isfinite(v) for v in losses.values())
    losses["loss"].backward()
    assert model.head.net.parameters().__next__().grad is not None
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.backbone.parameters())
    if fill == "learned":
        assert model.masker.mask_token.grad is not None


def test_prediction_has_one_teacher_sized_vector_per_cell():
    model = make()
    windows = fake_batch(2)[0]
    masked = torch.zeros(2, SIDE * SIDE, dtype=torch.bool)
    masked[:, 4] = True
    assert model.predict_cells(windows, masked).shape == (2, SIDE * SIDE, DIM)


def test_student_sees_masked_cells_painted_with_the_fill(monkeypatch):
    model = make(mask_ratio=0.5)
    seen = {}
    original = model.backbone.forward_features

    def spy(x):
        seen["input"] = x
        return original(x)

    monkeypatch.setattr(model.backbone, "forward_features", spy)
    model.objective(fake_batch())
    painted = seen["input"].reshape(4, 3, SIDE, TILE, SIDE, TILE).eq(0).all(dim=(1, 3, 5))  # (B, s, s)
    assert (painted.flatten(1).sum(dim=1) == 4).all()  # round(0.5 * 9) cells per window


def test_backbone_is_the_student_and_checkpoints_record_it():
    from histodistill.methods.base import backbone_record

    model = make()
    record = backbone_record(model)
    assert record["spec"]["timm_name"] == "test_resnet" and record["state_dict_prefix"] == "backbone.model."
    assert model.optim.lr == 1e-4 and model.optim.warmup_fraction == 0.05 and model.optim.name == "adamw"


def test_a_few_steps_lower_the_loss():
    model = make(w_masked=1.0, w_visible=1.0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    batch = fake_batch(4)
    torch.manual_seed(1)
    first = model.objective(batch)["loss"].item()
    for _ in range(6):
        optimizer.zero_grad()
        model.objective(batch)["loss"].backward()
        optimizer.step()
    model.eval()  # BatchNorm statistics settle only in eval; compare on the same masks
    torch.manual_seed(1)
    assert model.objective(batch)["loss"].item() < first


def test_standardize_uses_the_statistics_it_was_given_and_keeps_them_in_the_checkpoint():
    from histodistill.losses.masked_context import masked_context_loss, normalise_targets

    model = make(target_norm="standardize", loss="mse")
    batch = fake_batch()
    with pytest.raises(RuntimeError, match="statistics"):
        model.objective(batch)  # never silently trains on NaN targets
    teacher = batch[3][batch[2]]  # (N, D) the valid cells
    mean, std = teacher.mean(0), teacher.std(0, unbiased=False)
    model.set_target_statistics(mean.numpy(), std.numpy())
    torch.manual_seed(3)
    got = model.objective(batch)["loss"]
    torch.manual_seed(3)
    from histodistill.models.cell_mask import random_cell_mask

    masked = random_cell_mask(4, SIDE * SIDE, 0.5)
    expected = masked_context_loss(
        model.predict_cells(batch[0], masked),
        batch[3],
        masked,
        batch[2],
        "mse",
        target_norm="standardize",
        target_mean=mean,
        target_std=std,
    )["loss"]
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)
    assert torch.equal(model.state_dict()["target_mean"], mean) and torch.equal(
        model.state_dict()["target_std"], std
    )
    assert normalise_targets(teacher, "standardize", mean, std).mean(0).abs().max() < 1e-5
    assert "target_mean" not in make().state_dict()  # layer_norm checkpoints keep their keys
    with pytest.raises(ValueError, match="shape"):
        model.set_target_statistics(np.zeros(DIM + 1), np.ones(DIM + 1))
    with pytest.raises(ValueError, match="target_norm"):
        make(target_norm="batch")


def test_feature_statistics_over_every_tile_of_the_cache(tmp_path):
    from histodistill.data.teacher_features import feature_statistics

    rng = np.random.default_rng(0)
    parts = [rng.normal(5, 2, (7, 4)), rng.normal(-1, 1, (3, 4))]
    paths = []
    for k, part in enumerate(parts):
        with h5py.File(tmp_path / f"s{k}.h5", "w") as handle:
            handle["features"] = part.astype(np.float32)
        paths.append(tmp_path / f"s{k}.h5")
    mean, std, count = feature_statistics(paths)
    rows = np.concatenate(parts).astype(np.float32).astype(np.float64)
    assert count == 10
    np.testing.assert_allclose(mean, rows.mean(0), rtol=1e-9)
    np.testing.assert_allclose(std, rows.std(0), rtol=1e-9)


# ---- end to end: tile -> teacher cache -> histodistill fit -> extract with the fine-tuned student
# -------------
ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "mcmkd" / "tiny_cpu.yaml"


@pytest.mark.slow
def test_one_epoch_fit_uses_the_cache_lowers_the_loss_and_the_student_extracts(
    tiny_slide, tmp_path, monkeypatch
):
    from histodistill.cli import main
    from histodistill.features import extract
    from histodistill.features.teacher_cache import ensure_teacher_cache
    from histodistill.models.backbones import Backbone
    from histodistill.wsi.tiling import tile_slide

    tiles = tmp_path / "tiles"
    tile_slide(tiny_slide.path, tiles, target_mpp=0.5, patch_size=64)
    # as the tiny recipe states
    features_dir = ensure_teacher_cache(
        tiles, tiles, "tiny/vit-tiny-p8-64", rebuild=True, batch_size=32, pretrained=False
    )

    # From here on the teacher must never run: no extraction, no teacher forward.
    def refuse(*args, **kwargs):
        raise AssertionError("the teacher cache was rebuilt during fine-tuning")

    teacher_calls = []
    original_forward = Backbone.forward

    def spy(self, x):
        if self.spec.name == "tiny/vit-tiny-p8-64":
            teacher_calls.append(x.shape)
        return original_forward(self, x)

    monkeypatch.setattr(extract, "extract_slides", refuse)
    monkeypatch.setattr(Backbone, "forward", spy)
    run = tmp_path / "run"
    assert (
        main(
            [
                "fit",
                "--config",
                str(TINY),
                "--trainer.default_root_dir",
                str(run),
                "--data.init_args.tiles_dir",
                str(tiles),
                "--trainer.enable_progress_bar",
                "false",
                "--trainer.enable_model_summary",
                "false",
            ]
        )
        == 0
    )
    assert teacher_calls == []

    rows = list(csv.DictReader((run / "metrics.csv").open()))
    losses = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    assert len(losses) >= 6  # 32 windows of 3 x 3 (6 of 9 cells tissue at least), batch 4
    assert sum(losses[-3:]) / 3 < losses[0]

    monkeypatch.setattr(Backbone, "forward", original_forward)
    monkeypatch.undo()
    student_dir = extract.extract_slides(
        run / "checkpoints" / "last.ckpt", tiles, tmp_path / "out", device="cpu"
    )
    with h5py.File(student_dir / "tiny_slide.h5") as h5, h5py.File(features_dir / "tiny_slide.h5") as teacher:
        assert h5["features"].shape == (teacher["features"].shape[0], 512)  # resnet18 features per tile
        assert np.isfinite(h5["features"][:]).all()


@pytest.mark.slow
def test_standardize_fit_computes_the_statistics_from_the_cache_and_stores_them(tiny_slide, tmp_path):
    from histodistill.cli import main
    from histodistill.data.teacher_features import feature_statistics
    from histodistill.models.weights import read_checkpoint
    from histodistill.wsi.tiling import tile_slide

    tiles = tmp_path / "tiles"
    tile_slide(tiny_slide.path, tiles, target_mpp=0.5, patch_size=64)
    run = tmp_path / "run"
    assert (
        main(
            [
                "fit",
                "--config",
                str(TINY),
                "--trainer.default_root_dir",
                str(run),
                "--data.init_args.tiles_dir",
                str(tiles),
                "--model.init_args.target_norm",
                "standardize",
                "--model.init_args.loss",
                "mse",
                "--trainer.max_steps",
                "2",
                "--trainer.enable_progress_bar",
                "false",
                "--trainer.enable_model_summary",
                "false",
            ]
        )
        == 0
    )
    state = read_checkpoint(run / "checkpoints" / "last.ckpt")["state_dict"]
    mean, std, count = feature_statistics(sorted(tiles.glob("features_*/*.h5")))  # the teacher cache
    assert count > 0
    np.testing.assert_allclose(state["target_mean"].numpy(), mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(state["target_std"].numpy(), std, rtol=1e-5, atol=1e-6)


def test_mask_count_default_and_option(monkeypatch):
    from histodistill.models.cell_mask import masked_cell_count

    assert masked_cell_count(9, 0.5) == 4  # round half to even: 4 of 9, an effective ratio of 0.44
    assert masked_cell_count(9, 0.5, count=5) == 5
    model = make(mask_count=5)
    recorded = []
    import histodistill.methods.mcmkd as mcmkd

    real = mcmkd.random_cell_mask
    monkeypatch.setattr(
        mcmkd, "random_cell_mask", lambda *a, **k: recorded.append(real(*a, **k)) or recorded[-1]
    )
    model.objective(fake_batch())
    assert (recorded[0].sum(dim=1) == 5).all()


@pytest.mark.parametrize("frozen", [False, True])
def test_freeze_bn_stats_keeps_the_running_statistics(frozen):
    model = make(freeze_bn_stats=frozen).train()
    bn = next(m for m in model.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d))
    before = bn.running_mean.clone()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    loss = model.objective(fake_batch())["loss"]
    loss.backward()
    optimizer.step()
    assert torch.equal(bn.running_mean, before) == frozen
    assert bn.weight.grad is not None  # the affine part trains either way


@pytest.mark.parametrize("frozen", [False, True])
def test_freeze_bn_stats_holds_in_a_lightning_fit(frozen, tmp_path):
    import lightning as L
    from torch.utils.data import DataLoader, TensorDataset

    model = make(freeze_bn_stats=frozen)
    before = {k: v.clone() for k, v in model.backbone.state_dict().items() if "running_mean" in k}
    windows, cells, valid, teacher = fake_batch(batch_size=8)
    trainer = L.Trainer(
        max_steps=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(model, DataLoader(TensorDataset(windows, cells, valid, teacher), batch_size=4))
    after = {k: v for k, v in model.backbone.state_dict().items() if "running_mean" in k}
    assert all(torch.equal(before[k], after[k]) for k in before) == frozen
