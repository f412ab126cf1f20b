"""Masked ViT encoding on visible tokens only, and the two reconstruction decoders (MAE, SD-MAE).

The encoder is not a separate network: it is the timm `VisionTransformer` inside the method's
`Backbone`, driven part by part (patch_embed, fixed position table, blocks, norm) on the visible
tokens. So the pretrained weights *are* a timm ViT state dict and export needs no key mapping.
At mask ratio r the blocks see ``int(L·(1−r))`` tokens (+ cls), which is where MAE's speed-up
comes from.

Patches are flattened in (p, q, c) order (rows of the patch, columns, channels), as MAE does.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

from histodistill.errors import ConfigError
from histodistill.models.pos_embed import fix_position_table_, position_table

_LayerNorm = partial(nn.LayerNorm, eps=1e-6)  # eps of MAE, SD-MAE and timm's ViTs


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, L, p·p·C) with L = (H/p)·(W/p) in row-major patch order."""
    b, c, h, w = images.shape
    p = patch_size
    if h % p or w % p:
        raise ValueError(f"image size {h}x{w} is not a multiple of the patch size {p}")
    x = images.reshape(b, c, h // p, p, w // p, p)
    x = torch.einsum("bchpwq->bhwpqc", x)  # (B, h, w, p, p, C)
    return x.reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(
    patches: torch.Tensor, patch_size: int, grid_size: tuple[int, int], channels: int = 3
) -> torch.Tensor:
    """Inverse of `patchify`: (B, L, p·p·C) -> (B, C, rows·p, cols·p)."""
    b = patches.shape[0]
    rows, cols = grid_size
    p = patch_size
    x = patches.reshape(b, rows, cols, p, p, channels)
    x = torch.einsum("bhwpqc->bchpwq", x)  # (B, C, rows, p, cols, p)
    return x.reshape(b, channels, rows * p, cols * p)


@dataclass
class MaskInfo:
    """One random masking of a batch.

    ``ids_shuffle`` (B, L): patch indices, visible ones first; ``ids_restore`` (B, L) its inverse
    permutation; ``mask`` (B, L) float, 1 = removed, in the original patch order; ``num_visible`` K.
    """

    ids_shuffle: torch.Tensor
    ids_restore: torch.Tensor
    mask: torch.Tensor
    num_visible: int

    @property
    def ids_keep(self) -> torch.Tensor:
        """(B, K) indices of the visible patches."""
        return self.ids_shuffle[:, : self.num_visible]

    @property
    def ids_masked(self) -> torch.Tensor:
        """(B, L−K) indices of the removed patches."""
        return self.ids_shuffle[:, self.num_visible :]


def random_masking(
    batch_size: int,
    num_patches: int,
    mask_ratio: float,
    device: torch.device | str | None = None,
    generator: torch.Generator | None = None,
    num_visible: int | None = None,
) -> MaskInfo:
    """Per-sample uniform masking keeping exactly ``int(L·(1−r))`` patches (MAE's rule), or ``num_visible``
    when given (SD-MAE masks ``int(r·L)`` and keeps ``L − int(r·L)``).

    Sorting uniform noise gives an independent random permutation per sample; the first K indices
    (smallest noise) are kept.
    """
    if not 0 <= mask_ratio < 1:
        raise ConfigError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
    num_visible = int(num_patches * (1 - mask_ratio)) if num_visible is None else num_visible
    noise = torch.rand(batch_size, num_patches, generator=generator, device=device)  # (B, L)
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    mask = torch.ones(batch_size, num_patches, device=device)
    mask[:, :num_visible] = 0
    mask = torch.gather(mask, 1, ids_restore)  # back to the original patch order
    return MaskInfo(ids_shuffle, ids_restore, mask, num_visible)


def gather_tokens(tokens: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Select tokens per sample: (B, L, D), (B, K) -> (B, K, D)."""
    return torch.gather(tokens, 1, ids.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))


def _xavier_init(module: nn.Module) -> None:
    """MAE's initialisation: Linear xavier_uniform with zero bias, LayerNorm weight 1 and bias 0."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def prepare_vit_for_masking(vit: VisionTransformer, pos_embed: str, xavier_patch_embed: bool = True) -> None:
    """Make a freshly built timm ViT a masked-pretraining encoder, in place.

    Writes a fixed ``"2d"`` (MAE) or ``"1d"`` (SD-MAE) sin-cos table into ``vit.pos_embed`` and
    freezes it, then applies MAE's initialisation (Linear xavier_uniform, LayerNorm 1/0, cls token
    normal std 0.02, and with ``xavier_patch_embed`` the patch projection xavier_uniform on its flattened
    weight; without it the projection keeps PyTorch's Conv2d default, as SD-MAE's code leaves it).
    """
    if not isinstance(vit, VisionTransformer):
        raise TypeError(f"masked pretraining needs a timm VisionTransformer, got {type(vit).__name__}")
    if vit.reg_token is not None or vit.no_embed_class or vit.dynamic_img_size or vit.pos_embed is None:
        raise ValueError(
            "masked pretraining supports timm ViTs with absolute position embeddings that cover the cls "
            "token, no register tokens and a fixed image size"
        )
    table = position_table(pos_embed, vit.patch_embed.grid_size, vit.embed_dim, vit.num_prefix_tokens)
    fix_position_table_(vit.pos_embed, table)
    vit.apply(_xavier_init)
    if xavier_patch_embed:
        weight = vit.patch_embed.proj.weight  # (D, C, p, p): initialised like a Linear on (D, C·p·p)
        nn.init.xavier_uniform_(weight.view(weight.shape[0], -1))
    else:
        vit.patch_embed.proj.reset_parameters()
    if vit.cls_token is not None:
        nn.init.normal_(vit.cls_token, std=0.02)


def encode_visible(vit: VisionTransformer, images: torch.Tensor, ids_keep: torch.Tensor) -> torch.Tensor:
    """Run the ViT on the visible patches only.

    images (B, 3, H, W), ids_keep (B, K) -> tokens (B, P + K, D) after the final norm, where P is the
    number of prefix tokens (1 with a cls token, else 0) and the K patch tokens follow ``ids_keep``.
    Each step is the timm model's own forward_features step, with the masking inserted after the
    position embedding, so the exported model computes exactly this on a full image.
    """
    x = vit.patch_embed(images)  # (B, L, D)
    prefix = vit.num_prefix_tokens
    x = x + vit.pos_embed[:, prefix:]
    x = gather_tokens(x, ids_keep)  # (B, K, D)
    if vit.cls_token is not None:
        cls = vit.cls_token + vit.pos_embed[:, :prefix]  # (1, 1, D)
        x = torch.cat([cls.expand(x.shape[0], -1, -1), x], dim=1)  # (B, 1 + K, D)
    x = vit.pos_drop(x)
    x = vit.norm_pre(x)
    x = vit.blocks(x)
    return vit.norm(x)


def _decoder_blocks(dim: int, depth: int, num_heads: int, mlp_ratio: float) -> nn.Sequential:
    return nn.Sequential(
        *[
            Block(dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=True, norm_layer=_LayerNorm)
            for _ in range(depth)
        ]
    )


class MAEDecoder(nn.Module):
    """MAE's decoder: embed, append mask tokens, unshuffle, fixed 2-D table, blocks, norm, pixels.

    forward(tokens (B, P + K, D_enc), ids_restore (B, L)) -> predictions (B, L, p·p·3) for every
    patch in the original order (prefix outputs dropped).
    """

    def __init__(
        self,
        encoder_dim: int,
        grid_size: tuple[int, int],
        patch_size: int,
        dim: int = 512,
        depth: int = 8,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        num_prefix_tokens: int = 1,
        in_chans: int = 3,
    ) -> None:
        super().__init__()
        self.num_prefix_tokens = num_prefix_tokens
        self.embed = nn.Linear(encoder_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        # Fixed, so a buffer: never trained, rebuilt from the grid, not saved.
        self.register_buffer(
            "pos_table", position_table("2d", grid_size, dim, num_prefix_tokens)[None], persistent=False
        )
        self.blocks = _decoder_blocks(dim, depth, num_heads, mlp_ratio)
        self.norm = _LayerNorm(dim)
        self.pred = nn.Linear(dim, patch_size**2 * in_chans)
        self.apply(_xavier_init)
        nn.init.normal_(self.mask_token, std=0.02)

    def forward(self, tokens: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        p = self.num_prefix_tokens
        x = self.embed(tokens)  # (B, P + K, Dd)
        b, length = ids_restore.shape
        mask_tokens = self.mask_token.expand(b, length - (x.shape[1] - p), -1)  # (B, L − K, Dd)
        patches = torch.cat([x[:, p:], mask_tokens], dim=1)  # (B, L, Dd) in shuffled order
        patches = gather_tokens(patches, ids_restore)  # (B, L, Dd) in the original order
        x = torch.cat([x[:, :p], patches], dim=1) + self.pos_table  # (B, P + L, Dd)
        x = self.norm(self.blocks(x))
        return self.pred(x[:, p:])  # (B, L, p·p·3)


class SDMAEDecoder(nn.Module):
    """SD-MAE's decoder: bias-free bridge, [visible, mask] tokens with their fixed 1-D positions,
    blocks, then one LayerNorm for the masked part and another for the visible part.

    forward(visible (B, K, D_enc), mask: MaskInfo) -> (predictions (B, L−K, p·p·3) for
    ``mask.ids_masked``, visible outputs (B, K, Dd) for ``mask.ids_keep``, the self-distillation
    teacher's input). Visible tokens must be patch tokens only (no cls).
    """

    def __init__(
        self,
        encoder_dim: int,
        grid_size: tuple[int, int],
        patch_size: int,
        dim: int = 192,
        depth: int = 4,
        num_heads: int = 3,
        mlp_ratio: float = 4.0,
        in_chans: int = 3,
    ) -> None:
        super().__init__()
        self.bridge = nn.Linear(encoder_dim, dim, bias=False)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.register_buffer("pos_table", position_table("1d", grid_size, dim)[None], persistent=False)
        self.blocks = _decoder_blocks(dim, depth, num_heads, mlp_ratio)
        self.norm_masked = _LayerNorm(dim)
        self.norm_visible = _LayerNorm(dim)
        self.pred = nn.Linear(dim, patch_size**2 * in_chans)
        self.apply(_xavier_init)
        # SD-MAE's official code: the bridge keeps PyTorch's default init (its model-level _init_weights is
        # never applied), and trunc_normal_ is its wrapper with a = -std, b = std, a cut at ±1σ.
        self.bridge.reset_parameters()
        nn.init.trunc_normal_(self.mask_token, std=0.02, a=-0.02, b=0.02)

    def forward(self, visible: torch.Tensor, mask: MaskInfo) -> tuple[torch.Tensor, torch.Tensor]:
        b, k = visible.shape[:2]
        pos = self.pos_table.expand(b, -1, -1)  # (B, L, Dd)
        # Positions travel with their tokens, so the sequence needs no unshuffling.
        x = torch.cat(
            [
                self.bridge(visible) + gather_tokens(pos, mask.ids_keep),  # (B, K, Dd)
                self.mask_token + gather_tokens(pos, mask.ids_masked),  # (B, L − K, Dd)
            ],
            dim=1,
        )
        x = self.blocks(x)
        return self.pred(self.norm_masked(x[:, k:])), self.norm_visible(x[:, :k])


def scatter_patches(values: torch.Tensor, ids: torch.Tensor, num_patches: int) -> torch.Tensor:
    """Place per-patch values at their patch indices: (B, M, E), (B, M) -> (B, L, E), zeros elsewhere."""
    out = values.new_zeros(values.shape[0], num_patches, values.shape[-1])
    return out.scatter(1, ids.unsqueeze(-1).expand(-1, -1, values.shape[-1]), values)


def grid_of(vit: VisionTransformer) -> tuple[int, int]:
    """(rows, cols) of the ViT's patch grid."""
    rows, cols = vit.patch_embed.grid_size
    return int(rows), int(cols)


def patch_size_of(vit: VisionTransformer) -> int:
    size = vit.patch_embed.patch_size
    if size[0] != size[1]:
        raise ValueError(f"masked pretraining needs square patches, got {size}")
    return int(size[0])
