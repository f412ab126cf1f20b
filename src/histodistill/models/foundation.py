"""Pathology foundation models: one table of how each is built, prepared and pooled, with its sources.

Every entry states, as its model card and the loaders of TRIDENT (``trident/patch_encoder_models/load.py``)
and eva (``src/eva/vision/models/networks/backbones/pathology/*.py``) give them: the hub repository, how it is
built, the constructor arguments, mean/std, input size and mpp, the embedding definition (a name that
`histodistill.models.pooling.pool` applies) and its width, licence and gating, citation, and what must be
installed. ``source`` says where each fact was read, and which facts could not be read here (licences and
gating come from the model cards, which are not reachable from this code's development machines: check the
card before relying on them). `histodistill.models.backbones` registers every entry under its name;
``histodistill models`` prints the table, docs/models.md explains it.

How an entry is built (``build``):
- ``timm hf-hub``: ``timm.create_model("hf-hub:<hub_id>", **model_kwargs)``, timm reading the architecture
  from the repository's config.json; without the hub, ``architecture`` with ``model_kwargs``;
- ``timm + state dict``: ``architecture`` (a timm name or one of ours) with ``model_kwargs``, then the
  published ``weights_file`` of the repository (or URL) loaded strictly;
- ``transformers``: the transformers class named by ``architecture``; pretrained, its published config.json
  and weights (``hub_config``), else the stated config;
- ``package``: only the authors' package builds it; histodistill lists it and names the package.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from histodistill.models.preprocess import IMAGENET_MEAN, IMAGENET_STD, Preprocess

HF_EXTRA = "histodistill[hf]"
PACKAGES = {  # package -> how to install it (TRIDENT's messages)
    "conch": "pip install git+https://github.com/Mahmoodlab/CONCH.git",
    "musk": "pip install fairscale git+https://github.com/lilab-stanford/MUSK",
}
TRIDENT = "TRIDENT load.py"
EVA = "eva backbones/pathology"
CARD_UNREAD = "licence/gating: model card (not readable here)"

# Normalisations stated by the loaders.
HOPTIMUS_MEAN, HOPTIMUS_STD = (0.707223, 0.578729, 0.703617), (0.211883, 0.230117, 0.177517)
HIBOU_MEAN, HIBOU_STD = (0.7068, 0.5755, 0.722), (0.195, 0.2316, 0.1816)
HALF = (0.5, 0.5, 0.5)  # kaiko (TRIDENT KAIKO_MEAN/STD) and MUSK (timm IMAGENET_INCEPTION_MEAN/STD)
LUNIT_MEAN, LUNIT_STD = (0.70322989, 0.53606487, 0.66096631), (0.21716536, 0.26081574, 0.20723464)
OPENAI_MEAN, OPENAI_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)

_SWIGLU = {"mlp_layer": "SwiGLUPacked", "act_layer": "silu"}
_VIRCHOW = {"img_size": 224, "init_values": 1e-5, "mlp_ratio": 5.3375, "dynamic_img_size": True, **_SWIGLU}
_HOPTIMUS = {"img_size": 224, "init_values": 1e-5, "dynamic_img_size": True}
_DINOV2_VITG = {
    "hidden_size": 1536,
    "num_hidden_layers": 40,
    "num_attention_heads": 24,
    "mlp_ratio": 4,
    "use_swiglu_ffn": True,
    "patch_size": 14,
    "image_size": 224,
}


@dataclass(frozen=True)
class FoundationModel:
    """One row of the table; see the module docstring for ``build``. ``dim`` is the embedding's width
    (checked against the built model by the tests); ``gated`` is ``None`` where it could not be read."""

    name: str
    hub_id: str | None
    build: str
    architecture: str
    model_kwargs: dict[str, Any]
    preprocess: Preprocess
    embedding: str
    dim: int
    licence: str
    gated: bool | None
    citation: str
    source: str
    requires: str | None = None
    weights_file: str | None = None
    repo_type: str = "model"
    hub_config: bool = False
    notes: str = field(default="", compare=False)


def _at(mean, std, size: int = 224, mpp: float = 0.5) -> Preprocess:
    return Preprocess(tuple(mean), tuple(std), size, mpp)


_IMAGENET = _at(IMAGENET_MEAN, IMAGENET_STD)


def _kaiko(name: str, timm_name: str, dim: int, extra: dict[str, Any] | None = None) -> FoundationModel:
    return FoundationModel(
        f"pathology/kaiko-{name}",
        f"1aurent/{timm_name}.kaiko_ai_towards_large_pathology_fms",
        "timm hf-hub",
        timm_name,
        {"dynamic_img_size": True, **(extra or {})},
        _at(HALF, HALF),
        "cls",
        dim,
        "unknown (1aurent's timm port of kaiko-ai/towards_large_pathology_fms)",
        False,
        "Aben et al., Towards large-scale training of pathology foundation models, arXiv 2404.15217 (2024)",
        f"{TRIDENT} Kaiko*InferenceEncoder (hub port, 224 px transform, KAIKO mean/std); {EVA}/kaiko.py; "
        "20x: TRIDENT README; embedding: the class token (TRIDENT: timm's pooled output)",
    )


def _hoptimus(version: str, licence: str, gated: bool, citation: str, source: str) -> FoundationModel:
    """H-optimus-0 and -1: the same ViT-g/14 with 4 registers and Bioptimus' mean/std."""
    return FoundationModel(
        f"pathology/h-optimus-{version}",
        f"bioptimus/H-optimus-{version}",
        "timm hf-hub",
        "vit_giant_patch14_reg4_dinov2",
        dict(_HOPTIMUS),
        _at(HOPTIMUS_MEAN, HOPTIMUS_STD),
        "cls",
        1536,
        licence,
        gated,
        citation,
        f"{source}; 20x: TRIDENT README; {CARD_UNREAD}",
    )


FOUNDATION_MODELS: tuple[FoundationModel, ...] = (
    FoundationModel(
        "pathology/uni",
        "MahmoodLab/UNI",
        "timm hf-hub",
        "vit_large_patch16_224",
        {"init_values": 1e-5, "dynamic_img_size": True},
        _IMAGENET,
        "cls",
        1024,
        "CC-BY-NC-ND-4.0",
        True,
        "Chen et al., Towards a general-purpose foundation model for computational pathology, Nat Med (2024)",
        f"{TRIDENT} UNIInferenceEncoder; {EVA}/mahmood.py (HF login: gated); 20x: TRIDENT README; "
        f"{CARD_UNREAD}",
    ),
    FoundationModel(
        "pathology/uni2-h",
        "MahmoodLab/UNI2-h",
        "timm hf-hub",
        "vit_giant_patch14_224",
        {
            "img_size": 224,
            "patch_size": 14,
            "depth": 24,
            "num_heads": 24,
            "init_values": 1e-5,
            "embed_dim": 1536,
            "mlp_ratio": 2.66667 * 2,
            "no_embed_class": True,
            "reg_tokens": 8,
            "dynamic_img_size": True,
            **_SWIGLU,
        },
        _IMAGENET,
        "cls",
        1536,
        "CC-BY-NC-ND-4.0",
        True,
        "Chen et al., Nat Med (2024); UNI2-h model card (MahmoodLab, 2025)",
        f"{TRIDENT} UNIv2InferenceEncoder; {EVA}/mahmood.py (HF login: gated); 20x: TRIDENT README; "
        f"{CARD_UNREAD}",
    ),
    FoundationModel(
        "pathology/conch-v1",
        "MahmoodLab/CONCH",
        "package",
        "conch_ViT-B-16 (CoCa image tower, conch package)",
        {},
        _at(OPENAI_MEAN, OPENAI_STD, 448),
        "head",
        512,
        "CC-BY-NC-ND-4.0",
        True,
        "Lu et al., A visual-language foundation model for computational pathology, Nat Med (2024)",
        f"{TRIDENT} Conchv1InferenceEncoder (encode_image, no projection); 448 px and OpenAI mean/std: CONCH "
        f"repo conch_ViT-B-16.json and factory.py; 512-d and 20x: TRIDENT README; {CARD_UNREAD}",
        requires="conch",
    ),
    FoundationModel(
        "pathology/conch-v1.5",
        "MahmoodLab/conchv1_5",
        "timm + state dict",
        "histodistill:conch-v1.5-vision",
        {"img_size": 224},
        _at(IMAGENET_MEAN, IMAGENET_STD, 448),
        "head",
        768,
        "CC-BY-NC-ND-4.0",
        True,
        "Ding et al., Multimodal whole slide foundation model for pathology (TITAN), arXiv 2411.19666 (2024)",
        f"{TRIDENT} Conchv15InferenceEncoder and model_zoo/conchv1_5 (ViT-L/16 trunk, attentional pooler, "
        f"448 px bilinear, ImageNet mean/std); 768-d and 20x: TRIDENT README; {CARD_UNREAD}",
        weights_file="pytorch_model_vision.bin",
    ),
    FoundationModel(
        "pathology/virchow",
        "paige-ai/Virchow",
        "timm hf-hub",
        "vit_huge_patch14_224",
        dict(_VIRCHOW),
        _IMAGENET,
        "cls+mean_patch",
        2560,
        "Apache-2.0",
        True,
        "Vorontsov et al., A foundation model for clinical-grade computational pathology and rare cancers "
        "detection, Nat Med (2024)",
        f"{TRIDENT} VirchowInferenceEncoder (class token + mean of tokens 1:); 20x: TRIDENT README; "
        f"{CARD_UNREAD}",
    ),
    FoundationModel(
        "pathology/virchow2",
        "paige-ai/Virchow2",
        "timm hf-hub",
        "vit_huge_patch14_224",
        {**_VIRCHOW, "reg_tokens": 4},
        _IMAGENET,
        "cls+mean_patch",
        2560,
        "CC-BY-NC-ND-4.0",
        True,
        "Zimmermann et al., Virchow2: scaling self-supervised mixed magnification models in pathology, "
        "arXiv 2408.00738 (2024)",
        f"{TRIDENT} Virchow2InferenceEncoder (class token + mean of tokens 5:, registers excluded); "
        f"{EVA}/paige.py (HF login: gated); 20x: TRIDENT README; {CARD_UNREAD}",
    ),
    _hoptimus(
        "0",
        "Apache-2.0",
        False,
        "Saillard et al., H-optimus-0, github.com/bioptimus/releases (2024)",
        f"{TRIDENT} HOptimus0InferenceEncoder (global_pool token); {EVA}/bioptimus.py and eva "
        "replicate_evaluations.md (mean/std)",
    ),
    _hoptimus(
        "1",
        "CC-BY-NC-ND-4.0",
        True,
        "Bioptimus, H-optimus-1 model card (2025)",
        f"{TRIDENT} HOptimus1InferenceEncoder (as H-optimus-0)",
    ),
    FoundationModel(
        "pathology/h0-mini",
        "bioptimus/H0-mini",
        "timm hf-hub",
        "vit_base_patch14_reg4_dinov2",
        {"img_size": 224, "dynamic_img_size": True, **_SWIGLU},
        _at(HOPTIMUS_MEAN, HOPTIMUS_STD),
        "cls",
        768,
        "CC-BY-NC-ND-4.0",
        True,
        "Filiot et al., Distilling foundation models for robust and efficient models in digital pathology, "
        "arXiv 2501.16239 (2025)",
        f"{TRIDENT} H0MiniInferenceEncoder (hub config + SwiGLUPacked/SiLU, class token by default, cls+mean "
        f"optional: 768/1536 in its README); {EVA}/bioptimus.py (HF login: gated). The architecture comes "
        "from the hub's config.json; the timm name used without the hub (ViT-B/14, 4 registers) is not "
        "stated by TRIDENT/eva. mean/std: TRIDENT resolves them from the hub config (unread here), "
        f"H-optimus-0's assumed; {CARD_UNREAD}",
    ),
    FoundationModel(
        "pathology/prov-gigapath",
        "prov-gigapath/prov-gigapath",
        "timm hf-hub",
        "vit_giant_patch14_dinov2",
        {
            "img_size": 224,
            "patch_size": 16,
            "embed_dim": 1536,
            "depth": 40,
            "num_heads": 24,
            "mlp_ratio": 5.33334,
            "dynamic_img_size": True,
        },
        _IMAGENET,
        "cls",
        1536,
        "Apache-2.0",
        True,
        "Xu et al., A whole-slide foundation model for digital pathology from real-world data, Nature (2024)",
        f"{TRIDENT} GigaPathInferenceEncoder (resize 256 bicubic, centre crop 224); {EVA}/gigapath.py; "
        f"20x: TRIDENT README; {CARD_UNREAD}",
    ),
    FoundationModel(
        "pathology/phikon",
        "owkin/phikon",
        "transformers",
        "transformers:ViTModel",
        {
            "hidden_size": 768,
            "num_hidden_layers": 12,
            "num_attention_heads": 12,
            "intermediate_size": 3072,
            "patch_size": 16,
            "image_size": 224,
            "qkv_bias": True,
        },
        _IMAGENET,
        "cls",
        768,
        "Owkin non-commercial",
        False,
        "Filiot et al., Scaling self-supervised learning for histopathology with masked image modeling, "
        "medRxiv (2023)",
        f"{TRIDENT} PhikonInferenceEncoder (ViTModel without pooler, last_hidden_state[:, 0]); "
        f"{EVA}/owkin.py; 20x: TRIDENT README; {CARD_UNREAD}",
        requires=HF_EXTRA,
        weights_file="pytorch_model.bin",
        hub_config=True,
    ),
    FoundationModel(
        "pathology/phikon-v2",
        "owkin/phikon-v2",
        "transformers",
        "transformers:Dinov2Model",
        {
            "hidden_size": 1024,
            "num_hidden_layers": 24,
            "num_attention_heads": 16,
            "mlp_ratio": 4,
            "patch_size": 16,
            "image_size": 224,
        },
        _IMAGENET,
        "cls",
        1024,
        "Owkin non-commercial",
        False,
        "Filiot et al., Phikon-v2, a large and public feature extractor for biomarker prediction, "
        "arXiv 2409.09173 (2024)",
        f"{TRIDENT} Phikonv2InferenceEncoder (AutoModel, last_hidden_state[:, 0]; resize+crop 224); "
        f"{EVA}/owkin.py; 20x: TRIDENT README; {CARD_UNREAD}",
        requires=HF_EXTRA,
        weights_file="model.safetensors",
        hub_config=True,
    ),
    *(
        FoundationModel(
            f"pathology/hibou-{size.lower()}",
            f"histai/hibou-{size}",
            "transformers",
            "transformers:Dinov2WithRegistersModel",
            {
                "hidden_size": width,
                "num_hidden_layers": depth,
                "num_attention_heads": heads,
                "mlp_ratio": 4,
                "use_swiglu_ffn": True,
                "num_register_tokens": 4,
                "patch_size": 14,
                "image_size": 224,
            },
            _at(HIBOU_MEAN, HIBOU_STD),
            "cls",
            width,
            "Apache-2.0",
            None,
            "Nechaev et al., Hibou: a family of foundational vision transformers for pathology, "
            "arXiv 2406.05074 (2024)",
            f"{TRIDENT} HibouLInferenceEncoder (pooler_output = normalised class token; HIBOU mean/std, 224 "
            f"px bicubic); {EVA}/histai.py (DINOv2 with 4 registers through trust_remote_code). We build "
            "transformers' own Dinov2WithRegisters from the stated config instead of the hub's remote code; "
            "SwiGLU FFN and the weights' key layout are not stated by TRIDENT/eva (strict loading checks "
            f"them); 20x: TRIDENT README; {CARD_UNREAD}",
            requires=HF_EXTRA,
            weights_file="model.safetensors",
        )
        for size, width, depth, heads in (("B", 768, 12, 12), ("L", 1024, 24, 16))
    ),
    _kaiko("vits8", "vit_small_patch8_224", 384),
    _kaiko("vits16", "vit_small_patch16_224", 384),
    _kaiko("vitb8", "vit_base_patch8_224", 768),
    _kaiko("vitb16", "vit_base_patch16_224", 768),
    _kaiko("vitl14", "vit_large_patch14_reg4_dinov2", 1024, {"img_size": 518}),
    FoundationModel(
        "pathology/midnight-12k",
        "kaiko-ai/midnight",
        "transformers",
        "transformers:Dinov2Model",
        dict(_DINOV2_VITG),
        _at(HALF, HALF),
        "cls+mean_patch",
        3072,
        "MIT",
        False,
        "Karasikov et al., Training state-of-the-art pathology foundation models with orders of magnitude "
        "less data, arXiv 2504.05186 (2025)",
        f"{TRIDENT} Midnight12kInferenceEncoder (AutoModel, KAIKO mean/std, 224 px; return_type cls+mean "
        "gives the 3072-d of TRIDENT's README, its code default is the 1536-d class token, as eva's "
        f"IN_FEATURES); {EVA}/kaiko.py; 20x: TRIDENT README; {CARD_UNREAD}",
        requires=HF_EXTRA,
        weights_file="model.safetensors",
        hub_config=True,
    ),
    FoundationModel(
        "pathology/lunit-vits8",
        "1aurent/vit_small_patch8_224.lunit_dino",
        "timm hf-hub",
        "vit_small_patch8_224",
        {"dynamic_img_size": True},
        _at(LUNIT_MEAN, LUNIT_STD),
        "cls",
        384,
        "unknown (Lunit research release)",
        False,
        "Kang et al., Benchmarking self-supervised learning on diverse pathology datasets, CVPR (2023)",
        f"{TRIDENT} LunitS8InferenceEncoder (hub port; transform from the hub config); {EVA}/lunit.py "
        f"(mean/std of the ViT-S training); 20x: TRIDENT README; {CARD_UNREAD}",
    ),
    FoundationModel(
        "pathology/lunit-vits16",
        None,
        "timm + state dict",
        "vit_small_patch16_224",
        {"dynamic_img_size": True},
        _at(LUNIT_MEAN, LUNIT_STD),
        "cls",
        384,
        "unknown (Lunit research release)",
        False,
        "Kang et al., CVPR (2023)",
        f"{EVA}/lunit.py (GitHub release weights, mean/std); not in TRIDENT; mpp not stated by TRIDENT/eva "
        f"(0.5 as its ViT-S/8 sibling); {CARD_UNREAD}",
        weights_file="https://github.com/lunit-io/benchmark-ssl-pathology/releases/download/pretrained-weights/"
        "dino_vit_small_patch16_ep200.torch",
    ),
    FoundationModel(
        "pathology/ctranspath",
        "MahmoodLab/hest-bench",
        "timm + state dict",
        "histodistill:ctranspath",
        {},
        _at(IMAGENET_MEAN, IMAGENET_STD, 224, 1.0),
        "head",
        768,
        "unknown (weights: the CHIEF release)",
        None,
        "Wang et al., Transformer-based unsupervised contrastive learning for histopathological image "
        "classification, Med Image Anal (2022)",
        f"{TRIDENT} CTransPathInferenceEncoder and model_zoo/ctranspath (ConvStem Swin-T, CHIEF weights, "
        f"224 px bilinear, ImageNet mean/std); 10x (1.0 mpp): TRIDENT README; {CARD_UNREAD}",
        weights_file="fm_v1/ctranspath/CHIEF_CTransPath.pth",
        repo_type="dataset",
    ),
    FoundationModel(
        "pathology/gpfm",
        "majiabo/GPFM",
        "timm + state dict",
        "vit_large_patch14_dinov2",
        {"img_size": 224, "init_values": 1e-5, "dynamic_img_size": True},
        _IMAGENET,
        "cls",
        1024,
        "unknown",
        None,
        "Ma et al., Towards a generalizable pathology foundation model via unified knowledge distillation, "
        "arXiv 2407.18449 (2024)",
        f"{TRIDENT} GPFMInferenceEncoder (GPFM.pth loaded strictly, 224 px bicubic, ImageNet mean/std); "
        f"{EVA}/hkust.py; 20x: TRIDENT README; {CARD_UNREAD}",
        weights_file="GPFM.pth",
    ),
    FoundationModel(
        "pathology/musk",
        "xiangjx/musk",
        "package",
        "musk_large_patch16_384 (BEiT-3, musk package)",
        {},
        _at(HALF, HALF, 384),
        "head",
        1024,
        "CC-BY-NC-ND-4.0",
        True,
        "Xiang et al., A vision-language foundation model for precision oncology, Nature (2025)",
        f"{TRIDENT} MuskInferenceEncoder (vision class token, 384 px bicubic, inception mean/std); 1024-d "
        f"and 20x: TRIDENT README; {CARD_UNREAD}",
        requires="musk",
    ),
)
