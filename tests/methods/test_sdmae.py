"""MAE and SD-MAE as methods: loss composition, training, determinism, optimiser groups, and
`histodistill fit` end to end with the reconstruction figure and a checkpoint that exports to timm."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch

from histodistill.methods.sdmae import MAE, SDMAE
from histodistill.optim.optimizer import parameter_groups

ROOT = Path(__file__).resolve().parents[2]
TINY_VIT = {
    "backbone": "tiny/vit-tiny-p8-64",
    "backbone_kwargs": {"embed_dim": 32, "depth": 1, "num_heads": 2, "img_size": 32},
}
TINY_SDMAE = {
    **TINY_VIT,
    "decoder_dim": 32,
    "decoder_depth": 1,
    "decoder_heads": 2,
    "head_dim": 64,
    "head_hidden_dim": 32,
    "head_bottleneck_dim": 16,
}
TINY_MAE = {**TINY_VIT, "decoder_dim": 32, "decoder_depth": 1, "decoder_heads": 2}


def images(seed: int = 0) -> torch.Tensor:
    return torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def test_zero_distill_weight_gives_exactly_the_reconstruction_loss():
    torch.manual_seed(0)
    losses = SDMAE(**TINY_SDMAE, distill_weight=0.0).objective((images(), None))
    assert losses["distillation"].item() > 0
    assert torch.equal(losses["loss"], losses["reconstruction"])


def test_total_is_weighted_sum():
    torch.manual_seed(0)
    losses = SDMAE(**TINY_SDMAE, distill_weight=0.2).objective((images(), None))
    expected = 0.2 * losses["distillation"] + 0.8 * losses["reconstruction"]
    torch.testing.assert_close(losses["loss"], expected)


@pytest.mark.parametrize(("cls", "kwargs"), [(MAE, TINY_MAE), (SDMAE, TINY_SDMAE)])
def test_seeded_runs_are_identical(cls, kwargs):
    def run() -> list[float]:
        torch.manual_seed(3)
        module = cls(**kwargs)
        return [module.objective((images(i), None))["loss"].item() for i in range(2)]

    assert run() == run()


@pytest.mark.parametrize(("cls", "kwargs"), [(MAE, TINY_MAE), (SDMAE, TINY_SDMAE)])
def test_a_few_steps_lower_the_loss(cls, kwargs):
    torch.manual_seed(0)
    module = cls(**kwargs)
    batch = (images(), None)

    def loss_with_fixed_mask() -> float:
        torch.manual_seed(123)
        with torch.no_grad():
            return module.objective(batch)["reconstruction"].item()

    before = loss_with_fixed_mask()
    optimizer = torch.optim.AdamW(parameter_groups(module, 0.05), lr=3e-3)
    for _ in range(12):
        optimizer.zero_grad()
        module.objective(batch)["loss"].backward()
        optimizer.step()
    assert loss_with_fixed_mask() < 0.85 * before


def test_optimiser_groups_follow_the_recipe():
    module = SDMAE(**TINY_SDMAE)
    decay, no_decay = parameter_groups(module, 0.05)
    decay_ids, no_decay_ids = {id(p) for p in decay["params"]}, {id(p) for p in no_decay["params"]}
    vit = module.backbone.model
    frozen = [vit.pos_embed, module.student_head.last_layer.parametrizations.weight.original0]
    assert all(id(p) not in decay_ids | no_decay_ids for p in frozen)
    assert id(module.decoder.mask_token) in no_decay_ids and id(vit.blocks[0].norm1.weight) in no_decay_ids
    assert id(vit.blocks[0].attn.qkv.weight) in decay_ids


def test_preview_pastes_visible_patches_from_the_original():
    torch.manual_seed(0)
    module = MAE(**TINY_MAE).eval()
    preview = module.reconstruction_preview(images(), generator=torch.Generator().manual_seed(0))
    assert {k: tuple(v.shape) for k, v in preview.items()} == {k: (4, 3, 32, 32) for k in preview}
    same = (preview["reconstruction"] == preview["original"]).all(dim=1)  # (4, 32, 32)
    visible_pixels = same.float().mean().item()
    assert 0.24 <= visible_pixels < 0.5  # 4 of 16 patches are visible, plus chance equalities from clamping


def run_fit(config: Path, run_dir: Path, data: Path) -> None:
    from histodistill.cli import main

    code = main(
        [
            "fit",
            "--config",
            str(config),
            "--trainer.default_root_dir",
            str(run_dir),
            "--data.init_args.train.init_args.root",
            str(data),
            "--data.init_args.batch_size",
            "4",
            "--trainer.max_epochs",
            "1",
            "--trainer.enable_progress_bar",
            "false",
            "--trainer.enable_model_summary",
            "false",
        ]
    )
    assert code == 0


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["sdmae", "mae"])
def test_fit_writes_figures_and_a_checkpoint_that_exports_to_timm(tmp_path, recipe):
    from conftest import make_image_folder
    from histodistill.models.backbones import (
        BackboneSpec,
        checkpoint_backbone_state,
        create_backbone,
        timm_kwargs,
    )

    data = make_image_folder(tmp_path / "tiles", classes=("a", "b"), per_class=4, size=64)
    run_dir = tmp_path / "run"
    run_fit(ROOT / "configs" / recipe / "tiny_cpu.yaml", run_dir, data)
    assert (run_dir / "figures" / "reconstruction_final.png").stat().st_size > 0
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    spec = BackboneSpec.from_dict(checkpoint["histodistill_backbone"]["spec"])
    model = timm.create_model(spec.timm_name, num_classes=0, **timm_kwargs(spec.model_kwargs))
    model.load_state_dict(checkpoint_backbone_state(checkpoint), strict=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        features = model.eval()(x)
        served = create_backbone(run_dir / "checkpoints" / "last.ckpt").eval()(x)  # what extract/export read
    assert features.shape == (2, 96) and torch.isfinite(features).all()
    torch.testing.assert_close(served, features)


@pytest.mark.parametrize("cls", [SDMAE, MAE])
def test_inputs_are_normalised_with_imagenet_statistics_and_the_export_records_them(cls, tmp_path):
    import json

    from histodistill.features.export import save_backbone
    from histodistill.models.backbones import IMAGENET_MEAN, IMAGENET_STD

    # timm's vit_tiny_patch16_224 config says mean = std = 0.5; MAE and SD-MAE normalise with ImageNet's.
    kwargs = {
        "backbone": "vit_tiny_patch16_224",
        "backbone_kwargs": {"img_size": 32, "depth": 1},
        "decoder_dim": 16,
        "decoder_depth": 1,
        "decoder_heads": 2,
    }
    if cls is SDMAE:
        kwargs.update(head_dim=16, head_hidden_dim=16, head_bottleneck_dim=8)
    module = cls(**kwargs)
    assert module.preprocess.mean == IMAGENET_MEAN and module.preprocess.std == IMAGENET_STD
    config = json.loads((save_backbone(module.backbone, tmp_path / "export") / "config.json").read_text())
    assert config["pretrained_cfg"]["mean"] == list(IMAGENET_MEAN) and config["pretrained_cfg"][
        "std"
    ] == list(IMAGENET_STD)
    assert cls(**kwargs, normalization="backbone").preprocess.mean == (0.5, 0.5, 0.5)


def test_official_init_and_mask_count_details():
    # SD-MAE (irsLu/SD-MAE): masks int(r·L) and keeps the rest; trunc_normal_ cut at ±std; bridge and patch
    # projection at PyTorch's defaults. MAE: keeps int(L·(1−r)); patch projection xavier_uniform.
    shape = {
        "backbone": "vit_tiny_patch16_224",
        "backbone_kwargs": {"img_size": 96, "patch_size": 8, "depth": 1, "embed_dim": 48, "num_heads": 3},
        "mask_ratio": 0.6,
        "decoder_dim": 16,
        "decoder_depth": 1,
        "decoder_heads": 2,
    }
    torch.manual_seed(0)
    sdmae = SDMAE(**shape, head_dim=16, head_hidden_dim=16, head_bottleneck_dim=8)
    mae = MAE(**shape)
    images = torch.randn(2, 3, 96, 96)
    assert sdmae.random_mask(images).num_visible == 144 - int(0.6 * 144) == 58
    assert mae.random_mask(images).num_visible == int(144 * 0.4) == 57
    for head in (sdmae.student_head, sdmae.teacher_head):
        assert all(m.weight.abs().max() <= 0.02 for m in head.mlp if isinstance(m, torch.nn.Linear))
    assert sdmae.decoder.mask_token.abs().max() <= 0.02
    fan_in = 3 * 8 * 8
    assert sdmae.backbone.model.patch_embed.proj.weight.abs().max() <= fan_in**-0.5  # Conv2d default bound
    # xavier: (6 / (192 + 48))^0.5
    assert mae.backbone.model.patch_embed.proj.weight.abs().max() > fan_in**-0.5
    bridge = sdmae.decoder.bridge.weight
    assert bridge.abs().max() <= bridge.shape[1] ** -0.5  # Linear default, not xavier


def test_the_pooled_feature_is_the_official_probes_fresh_layernorm_on_un_normed_token_means():
    # irsLu/SD-MAE modeling_finetune.py, use_mean_pooling=True: norm = Identity, fc_norm = a new LayerNorm on
    # x.mean(1); run_mae_eval_linear.py loads the pretrained weights non-strictly, so the pretrained final
    # norm is dropped and fc_norm stays at weight 1, bias 0 (the encoder is frozen).
    torch.manual_seed(0)
    module = SDMAE(**TINY_SDMAE)
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        loss = module.objective((images(), None))["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    vit = module.backbone.model.eval()
    x = images(1)
    with torch.no_grad():
        tokens = vit.blocks(vit.patch_embed(x) + vit.pos_embed)  # (B, L, D), no final norm
        official = torch.nn.functional.layer_norm(tokens.mean(1), (tokens.shape[-1],), eps=1e-6)
        torch.testing.assert_close(module.backbone(x), official)
        assert not any(p.requires_grad for p in vit.fc_norm.parameters())
        # pretraining still normalises the encoder's tokens, with a LayerNorm that trains
        assert not torch.equal(module.encoder_norm.weight, torch.ones_like(module.encoder_norm.weight))
    kept = SDMAE(
        **{**TINY_SDMAE, "backbone_kwargs": {**TINY_VIT["backbone_kwargs"], "fc_norm": False}}
    ).eval()
    with torch.no_grad():  # the option: the mean of the final-normed tokens, the final norm in the backbone
        vit = kept.backbone.model
        torch.testing.assert_close(
            kept.backbone(x), vit.norm(vit.blocks(vit.patch_embed(x) + vit.pos_embed)).mean(1)
        )
    assert isinstance(kept.encoder_norm, torch.nn.Identity)
