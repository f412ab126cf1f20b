"""Masked-image pretraining of a ViT on unlabeled patches: MAE and SD-MAE.

- `MAE` (He et al. 2022): reconstruct the pixels of the removed patches from the visible ones.
- `SDMAE` (Luo et al. 2022): MAE with SD-MAE's small decoder and per-channel pixel target, plus
  self-distillation on the visible patches (encoder tokens = student, decoder outputs at the same
  patches = teacher): ``L = λ·L_distill + (1 − λ)·L_rec``. With λ = 0 it is a plain masked
  autoencoder with SD-MAE's decoder.

Both train the timm ViT inside ``self.backbone`` directly (see `histodistill.models.vit_mae`), so
the checkpoint's backbone record exports to a timm ViT without key mapping. Batches are
``(images, anything)``; the second element (labels or coords) is ignored.
"""

from __future__ import annotations

import copy
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from histodistill.errors import ConfigError
from histodistill.losses.mae import channel_norm_target, masked_patch_mse, patch_norm_target
from histodistill.losses.self_distillation import SelfDistillationLoss
from histodistill.methods.base import MethodModule
from histodistill.models.backbones import IMAGENET_MEAN, IMAGENET_STD, create_backbone
from histodistill.models.dino_head import DINOHead
from histodistill.models.vit_mae import (
    MAEDecoder,
    MaskInfo,
    SDMAEDecoder,
    encode_visible,
    grid_of,
    patch_size_of,
    patchify,
    prepare_vit_for_masking,
    random_masking,
    scatter_patches,
    unpatchify,
)
from histodistill.optim.optimizer import OptimConfig

# SD-MAE's encoder has no cls token. Its features are those of the official linear probe and fine-tuning
# (modeling_finetune.py, use_mean_pooling=True): a fresh LayerNorm (timm's fc_norm) on the mean of the
# un-normed patch tokens, the pretrained final norm dropped. ``backbone_kwargs: {fc_norm: false}`` instead
# keeps the final norm on the tokens and mean-pools the normed tokens.
SDMAE_BACKBONE_KWARGS = {"class_token": False, "global_pool": "avg", "fc_norm": True}


class _MaskedPretraining(MethodModule):
    """What MAE and SD-MAE share: the backbone turned masked encoder, masking, pixel conversions and
    the preview the `ReconstructionFigure` callback draws. Subclasses implement `predict` (predictions
    in target space for every patch), `target` and `target_to_pixels`."""

    pos_embed_kind: str
    xavier_patch_embed = True  # MAE initialises the patch projection like a Linear; SD-MAE leaves it

    def visible_count(self) -> int:
        """Patches kept per image: ``int(L·(1−r))`` (MAE's rule)."""
        return int(self.num_patches * (1 - self.mask_ratio))

    def __init__(
        self,
        backbone: str,
        backbone_kwargs: dict[str, Any] | None,
        mask_ratio: float,
        optim: OptimConfig | None,
        normalization: str = "imagenet",
    ) -> None:
        super().__init__(optim)
        if not 0 < mask_ratio < 1:
            raise ConfigError(f"`mask_ratio={mask_ratio}`: must be in (0, 1)")
        if normalization not in ("imagenet", "backbone"):
            raise ConfigError(f"`normalization={normalization!r}`: must be imagenet or backbone")
        # Masked-image pretraining starts from random weights, as MAE and SD-MAE do.
        self.backbone = create_backbone(backbone, pretrained=False, **(backbone_kwargs or {}))
        if normalization == "imagenet":
            # MAE and SD-MAE normalise with ImageNet mean/std, whereas timm's vit_*_patch16_224 configs say
            # 0.5/0.5/0.5. The spec carries it, so the data module, checkpoints and exports all use it.
            preprocess = replace(self.backbone.spec.preprocess, mean=IMAGENET_MEAN, std=IMAGENET_STD)
            self.backbone.spec = replace(self.backbone.spec, preprocess=preprocess)
        prepare_vit_for_masking(self.backbone.model, self.pos_embed_kind, self.xavier_patch_embed)
        self.mask_ratio = mask_ratio
        self.patch_size = patch_size_of(self.backbone.model)
        self.grid_size = grid_of(self.backbone.model)
        self.num_patches = self.grid_size[0] * self.grid_size[1]

    def random_mask(self, images: torch.Tensor, generator: torch.Generator | None = None) -> MaskInfo:
        if generator is None:
            return random_masking(
                images.shape[0],
                self.num_patches,
                self.mask_ratio,
                images.device,
                num_visible=self.visible_count(),
            )
        # A seeded CPU generator gives the same preview masks on any device.
        mask = random_masking(
            images.shape[0],
            self.num_patches,
            self.mask_ratio,
            generator=generator,
            num_visible=self.visible_count(),
        )
        return MaskInfo(
            *(t.to(images.device) for t in (mask.ids_shuffle, mask.ids_restore, mask.mask)), mask.num_visible
        )

    def to_pixels(self, images: torch.Tensor) -> torch.Tensor:
        """Undo the input normalisation: (B, 3, H, W) normalised -> (B, 3, H, W) in [0, 1]."""
        pre = self.preprocess
        mean = torch.as_tensor(pre.mean, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
        std = torch.as_tensor(pre.std, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
        return images * std + mean

    def predict(self, images: torch.Tensor, mask: MaskInfo) -> torch.Tensor:
        """Predictions in target space for every patch: (B, L, p·p·3)."""
        raise NotImplementedError

    def target(self, images: torch.Tensor) -> torch.Tensor:
        """Reconstruction target of every patch: (B, L, p·p·3)."""
        raise NotImplementedError

    def target_to_pixels(self, pred: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        """Predictions in target space -> pixel patches in [0, 1], (B, L, p·p·3), de-normalised with each
        patch's statistics in the original image (MAE's visualisation: ground-truth colour statistics,
        predicted structure)."""
        raise NotImplementedError

    @torch.no_grad()
    def reconstruction_preview(
        self, images: torch.Tensor, generator: torch.Generator | None = None
    ) -> dict[str, torch.Tensor]:
        """Images (N, 3, H, W) normalised -> ``original``, ``masked`` (removed patches grey) and
        ``reconstruction`` (visible patches pasted over the prediction), each (N, 3, H, W) in [0, 1]."""
        mask = self.random_mask(images, generator)
        pixels = self.to_pixels(images).clamp(0, 1)
        patches = patchify(pixels, self.patch_size)  # (N, L, p·p·3)
        predicted = self.target_to_pixels(self.predict(images, mask), images).clamp(0, 1)
        removed = mask.mask.unsqueeze(-1)  # (N, L, 1)
        masked = patches * (1 - removed) + 0.5 * removed
        pasted = patches * (1 - removed) + predicted * removed
        return {
            "original": pixels,
            "masked": unpatchify(masked, self.patch_size, self.grid_size),
            "reconstruction": unpatchify(pasted, self.patch_size, self.grid_size),
        }


class MAE(_MaskedPretraining):
    """MAE pretraining: fixed 2-D sin-cos positions, cls token, 8×512 decoder, norm-pix loss.

    Args:
        backbone: timm ViT name (or any name `create_backbone` accepts) of the encoder to pretrain.
        backbone_kwargs: constructor overrides for it (``img_size``, ``patch_size``, ``embed_dim``...);
            the exported model is ``timm.create_model(backbone, num_classes=0, **backbone_kwargs)``.
        mask_ratio: fraction of patches removed per image (MAE: 0.75).
        norm_pix_loss: normalise each target patch by its own mean and std (MAE's best setting).
        decoder_dim, decoder_depth, decoder_heads: decoder width, blocks and heads (MAE: 512, 8, 16).
        optim: optimiser and schedule (MAE: AdamW β=(0.9, 0.95), lr 1.5e-4 × batch/256).
    """

    pos_embed_kind = "2d"

    def __init__(
        self,
        backbone: str = "vit_base_patch16_224",
        backbone_kwargs: dict[str, Any] | None = None,
        mask_ratio: float = 0.75,
        norm_pix_loss: bool = True,
        decoder_dim: int = 512,
        decoder_depth: int = 8,
        decoder_heads: int = 16,
        optim: OptimConfig | None = None,
        normalization: str = "imagenet",
    ) -> None:
        super().__init__(backbone, backbone_kwargs, mask_ratio, optim, normalization)
        vit = self.backbone.model
        self.norm_pix_loss = norm_pix_loss
        self.decoder = MAEDecoder(
            vit.embed_dim,
            self.grid_size,
            self.patch_size,
            dim=decoder_dim,
            depth=decoder_depth,
            num_heads=decoder_heads,
            num_prefix_tokens=vit.num_prefix_tokens,
        )

    def predict(self, images: torch.Tensor, mask: MaskInfo) -> torch.Tensor:
        tokens = encode_visible(self.backbone.model, images, mask.ids_keep)  # (B, P + K, D)
        return self.decoder(tokens, mask.ids_restore)  # (B, L, p·p·3)

    def target(self, images: torch.Tensor) -> torch.Tensor:
        # MAE reconstructs the network's (normalised) input, not raw pixels.
        patches = patchify(images, self.patch_size)
        return patch_norm_target(patches) if self.norm_pix_loss else patches

    def target_to_pixels(self, pred: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        if self.norm_pix_loss:
            original = patchify(images, self.patch_size)
            pred = pred * (original.var(dim=-1, keepdim=True) + 1e-6) ** 0.5 + original.mean(
                dim=-1, keepdim=True
            )
        normalised = unpatchify(pred, self.patch_size, self.grid_size)
        return patchify(self.to_pixels(normalised), self.patch_size)

    def objective(self, batch: Any) -> dict[str, torch.Tensor]:
        images = batch[0]
        mask = self.random_mask(images)
        reconstruction = masked_patch_mse(self.predict(images, mask), self.target(images), mask.mask)
        return {"loss": reconstruction, "reconstruction": reconstruction}


class SDMAE(_MaskedPretraining):
    """SD-MAE pretraining: ViT without cls token, fixed 1-D sin-cos positions, 4×192 decoder,
    per-channel pixel target, and self-distillation on the visible patches.

    Args:
        backbone, backbone_kwargs: the encoder, as for `MAE`; the kwargs default to SD-MAE's
            ``{class_token: False, global_pool: avg, fc_norm: True}`` and are merged over them. With
            ``fc_norm: True`` the encoder's final LayerNorm (used in pretraining) lives in ``encoder_norm``,
            outside the backbone, and the backbone's ``fc_norm`` stays at its fresh 1/0: the extracted
            feature is the official probe's ``LayerNorm(mean of un-normed tokens)``. ``fc_norm: False``
            keeps the final norm in the backbone: the feature is the mean of the final-normed tokens.
        mask_ratio: fraction of patches removed (0.75; the official PCam recipe uses 0.6).
        decoder_dim, decoder_depth, decoder_heads: SD-MAE's decoder (192, 4, 3).
        distill_weight: λ in ``λ·L_distill + (1 − λ)·L_rec`` (0.2; 0 = no self-distillation).
        head_dim, head_hidden_dim, head_bottleneck_dim: DINO heads' output, hidden and bottleneck
            widths (4096, 2048, 256).
        student_temp, teacher_temp: softmax temperatures of the student and teacher (0.1, 0.04).
        center_momentum: EMA momentum of the teacher centre (0.9).
        teacher_stop_grad: detach the teacher branch in the distillation term (official code: False).
        optim: optimiser and schedule (official: AdamW β=(0.9, 0.999), lr 6e-4 × batch/256).
        normalization: input mean/std, as for `MAE` (official: ImageNet's).
    """

    pos_embed_kind = "1d"
    xavier_patch_embed = False

    def visible_count(self) -> int:
        """SD-MAE's RandomMaskingGenerator masks ``int(r·L)`` patches and keeps the rest (58 of 144 at r =
        0.6, where MAE's rule keeps 57)."""
        return self.num_patches - int(self.mask_ratio * self.num_patches)

    def __init__(
        self,
        backbone: str = "vit_small_patch16_224",
        backbone_kwargs: dict[str, Any] | None = None,
        mask_ratio: float = 0.75,
        decoder_dim: int = 192,
        decoder_depth: int = 4,
        decoder_heads: int = 3,
        distill_weight: float = 0.2,
        head_dim: int = 4096,
        head_hidden_dim: int = 2048,
        head_bottleneck_dim: int = 256,
        student_temp: float = 0.1,
        teacher_temp: float = 0.04,
        center_momentum: float = 0.9,
        teacher_stop_grad: bool = False,
        optim: OptimConfig | None = None,
        normalization: str = "imagenet",
    ) -> None:
        if not 0 <= distill_weight <= 1:
            raise ConfigError(f"`distill_weight={distill_weight}`: must be in [0, 1]")
        super().__init__(
            backbone, {**SDMAE_BACKBONE_KWARGS, **(backbone_kwargs or {})}, mask_ratio, optim, normalization
        )
        vit = self.backbone.model
        # Pretraining normalises the encoder's tokens; the pooled feature uses a fresh, frozen fc_norm
        # instead.
        self.encoder_norm = nn.Identity()
        if isinstance(vit.norm, nn.Identity) and not isinstance(vit.fc_norm, nn.Identity):
            self.encoder_norm = copy.deepcopy(vit.fc_norm)
            vit.fc_norm.requires_grad_(False)
        self.distill_weight = distill_weight
        self.decoder = SDMAEDecoder(
            vit.embed_dim,
            self.grid_size,
            self.patch_size,
            dim=decoder_dim,
            depth=decoder_depth,
            num_heads=decoder_heads,
        )
        head_shape = {
            "out_dim": head_dim,
            "hidden_dim": head_hidden_dim,
            "bottleneck_dim": head_bottleneck_dim,
        }
        self.student_head = DINOHead(vit.embed_dim, **head_shape)
        self.teacher_head = DINOHead(decoder_dim, **head_shape)
        self.distillation = SelfDistillationLoss(
            head_dim, student_temp, teacher_temp, center_momentum, teacher_stop_grad
        )

    def forward_branches(self, images: torch.Tensor, mask: MaskInfo) -> dict[str, torch.Tensor]:
        """``pred`` (B, L, p·p·3) in target space (zeros at visible patches), ``student`` and ``teacher``
        head outputs averaged over the visible patches, (B, head_dim) each."""
        vit = self.backbone.model
        # (B, K, D)
        tokens = self.encoder_norm(encode_visible(vit, images, mask.ids_keep)[:, vit.num_prefix_tokens :])
        pred_masked, decoded_visible = self.decoder(tokens, mask)  # (B, L−K, p·p·3), (B, K, Dd)
        return {
            "pred": scatter_patches(pred_masked, mask.ids_masked, self.num_patches),
            # Per token, then averaged over the visible patches: (B, head_dim) each.
            "student": self.student_head.forward_token_mean(tokens),
            "teacher": self.teacher_head.forward_token_mean(decoded_visible),
        }

    def predict(self, images: torch.Tensor, mask: MaskInfo) -> torch.Tensor:
        return self.forward_branches(images, mask)["pred"]

    def target(self, images: torch.Tensor) -> torch.Tensor:
        # SD-MAE reconstructs the image in [0, 1], each patch normalised per channel.
        return channel_norm_target(patchify(self.to_pixels(images), self.patch_size))

    def target_to_pixels(self, pred: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        original = patchify(self.to_pixels(images), self.patch_size)
        b, length, e = original.shape
        original = original.reshape(b, length, e // 3, 3)  # (B, L, p·p, 3)
        pred = pred.reshape(b, length, e // 3, 3)
        pixels = pred * (original.std(dim=-2, keepdim=True) + 1e-6) + original.mean(dim=-2, keepdim=True)
        return pixels.reshape(b, length, e)

    def objective(self, batch: Any) -> dict[str, torch.Tensor]:
        images = batch[0]
        mask = self.random_mask(images)
        out = self.forward_branches(images, mask)
        reconstruction = masked_patch_mse(out["pred"], self.target(images), mask.mask)
        distillation = self.distillation(out["student"], out["teacher"])
        loss = self.distill_weight * distillation + (1 - self.distill_weight) * reconstruction
        return {"loss": loss, "reconstruction": reconstruction, "distillation": distillation}
