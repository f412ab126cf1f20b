"""One registry and one interface for every backbone: timm names, ``hf-hub:`` ids, local weight files,
checkpoints of our own methods and exported directories.

`create_backbone` returns a `Backbone`: a timm model built with ``num_classes=0`` plus its `BackboneSpec`
(architecture, constructor arguments and `Preprocess`), so mean/std/input size/mpp travel with the
weights and extraction cannot normalise wrongly.

Pretrained weights are the default, as in CLAM and TRIDENT: a timm name, an ``hf-hub:`` id or a
registered name loads its published weights through timm and huggingface_hub (and their cache).
Random weights only with ``pretrained=False``, and a line on stderr says so. Weights that cannot be
had (offline, gated) are a `UserError` naming the model and the remedies, never a silent random start.
"""

from __future__ import annotations

import difflib
import json
import os
import sys
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from histodistill.errors import UserError
from histodistill.models.architectures import BUILDERS, CONVERTERS, is_transformers
from histodistill.models.foundation import FOUNDATION_MODELS, PACKAGES, FoundationModel
from histodistill.models.hub import hub_access, unreachable_remedy
from histodistill.models.pooling import embedding_dim, pool
from histodistill.models.preprocess import IMAGENET_MEAN, IMAGENET_STD, Preprocess
from histodistill.models.registry import Registry
from histodistill.models.weights import first_line, load_weights, read_checkpoint, read_state_dict

# Key under which our checkpoints describe their backbone (written by methods/base.py::backbone_record).
CHECKPOINT_BACKBONE_KEY = "histodistill_backbone"
# An export is a timm model folder (what timm's push_to_hf_hub writes and its local-dir:/hf-hub: loaders
# read): the weights, and config.json with our BackboneSpec under EXPORT_SPEC_KEY (timm ignores it).
EXPORT_WEIGHTS = "model.safetensors"
EXPORT_CONFIG = "config.json"
EXPORT_SPEC_KEY = "histodistill"
# timm layer classes that model_kwargs may name as strings, so specs stay JSON (e.g. UNI2-h's MLP).
_LAYER_NAMES = ("Mlp", "GluMlp", "SwiGLU", "SwiGLUPacked")


@dataclass(frozen=True)
class BackboneSpec:
    """Everything needed to rebuild a backbone: ``timm.create_model(timm_name, num_classes=0,
    **model_kwargs)``.

    ``name`` is what the user asked for (registered name, timm name, file); ``source`` says where the
    weights came from: ``random``, ``timm:<hub id or tag>``, ``hf-hub:<id>``, ``weights:<file>``,
    ``checkpoint:<file>`` or ``export:<dir>``. ``timm_name`` may also name one of our non-timm architectures
    (`histodistill.models.architectures.BUILDERS`). ``embedding`` is how tokens become the pooled vector
    (`histodistill.models.pooling`; ``head``: the model's own pooled output).
    """

    name: str
    timm_name: str
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    preprocess: Preprocess = field(default_factory=Preprocess)
    source: str = "random"
    embedding: str = "head"

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (stored in checkpoints, exports' ``config.json`` and
        ``extractor.json``)."""
        data = asdict(self)
        data["preprocess"]["mean"] = list(self.preprocess.mean)
        data["preprocess"]["std"] = list(self.preprocess.std)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BackboneSpec:
        return cls(
            name=data["name"],
            timm_name=data["timm_name"],
            model_kwargs=dict(data.get("model_kwargs", {})),
            preprocess=Preprocess.from_dict(data["preprocess"]),
            source=data.get("source", "random"),
            embedding=data.get("embedding", "head"),
        )


@dataclass(frozen=True)
class BackboneEntry:
    """A registered backbone: architecture, arguments, preprocessing, embedding, and where pretrained
    weights live: ``hub_id`` alone for ``timm.create_model("hf-hub:<hub_id>", pretrained=True)``; with
    ``weights_file``, that file of the hub repository (``repo_type``), or a URL, loaded into the stated
    architecture (transformers architectures read the repository's config.json too when ``hub_config``);
    neither: timm's own weights. ``requires`` names what must be installed (`FoundationModel.requires`)."""

    timm_name: str
    model_kwargs: dict[str, Any]
    preprocess: Preprocess
    hub_id: str | None = None
    description: str = ""
    embedding: str = "head"
    weights_file: str | None = None
    repo_type: str = "model"
    hub_config: bool = False
    requires: str | None = None


BACKBONES: Registry[BackboneEntry] = Registry("backbone")


def register_backbone(name: str, entry: BackboneEntry) -> BackboneEntry:
    """Add a named backbone (``namespace/name``); refuses a name that exists."""
    return BACKBONES.register(name, entry)


def list_backbones(namespace: str | None = None) -> list[str]:
    """Registered names, e.g. ``list_backbones("pathology")``."""
    return BACKBONES.list(namespace)


class Backbone(nn.Module):
    """A timm model without classifier (``.model``) and its `BackboneSpec` (``.spec``).

    ``forward(x)`` (B, 3, H, W) -> (B, D) pooled features, D = ``num_features``, as ``spec.embedding``
    defines them (e.g. Virchow2: class token + mean patch token, D = 2 x 1280);
    ``forward_features(x)`` -> (B, C, h, w) for CNNs (``feature_kind == "map"``) or (B, N, C) tokens for
    ViTs (``"tokens"``, the first ``num_prefix_tokens`` being class/register tokens); C is the model's width
    (``model.num_features``), which differs from D for ``cls+mean_patch`` and attention-pooled models.
    """

    def __init__(self, model: nn.Module, spec: BackboneSpec) -> None:
        super().__init__()
        self.model = model
        self.spec = spec

    @property
    def num_features(self) -> int:
        return embedding_dim(int(self.model.num_features), self.spec.embedding)

    @property
    def feature_kind(self) -> str:
        # timm's token models (ViT, DeiT, EVA...) all declare their prefix tokens; CNNs do not.
        return "tokens" if hasattr(self.model, "num_prefix_tokens") else "map"

    @property
    def num_prefix_tokens(self) -> int:
        return int(getattr(self.model, "num_prefix_tokens", 0))

    @property
    def preprocess(self) -> Preprocess:
        return self.spec.preprocess

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_features(x)

    def pool(self, features: torch.Tensor) -> torch.Tensor:
        """``forward_features`` output -> (B, D), the embedding ``spec.embedding`` names."""
        return pool(self.model, features, self.spec.embedding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.model.forward_features(x))  # (B, D)


def create_backbone(
    name: str | os.PathLike,
    pretrained: bool = True,
    weights: str | os.PathLike | None = None,
    *,
    strict: bool = True,
    **model_kwargs: Any,
) -> Backbone:
    """Build a backbone from a registered name, a timm name, an ``hf-hub:`` id, one of our ``.ckpt``
    checkpoints, or an exported directory (``model.safetensors`` + ``config.json``).

    Names load their published weights (timm's default tag, or the registered entry's hub id) from the
    Hugging Face cache or hub; ``pretrained=False`` builds them randomly initialised (said on stderr).
    ``weights`` is a local file (safetensors, or a .pth/.pt/.bin state dict, possibly wrapped) loaded
    instead, strictly unless ``strict=False``. Checkpoints and exports always carry their own weights.
    ``model_kwargs`` go to ``timm.create_model`` (e.g. ``img_size=448``).

    Raises `UserError` for an unknown name (with the closest registered and timm names) and for
    pretrained weights that cannot be had (offline, gated, none published), naming the remedies.
    """
    path = Path(name)
    if path.is_dir():
        backbone = _from_export(path, model_kwargs)
    elif path.suffix == ".ckpt":
        backbone = _from_checkpoint(path, model_kwargs)
    elif str(name) in BACKBONES:
        backbone = _from_entry(
            str(name), BACKBONES.get(str(name)), pretrained and weights is None, model_kwargs
        )
    elif str(name).startswith("hf-hub:"):
        backbone = _from_hub_id(str(name), pretrained and weights is None, model_kwargs)
    elif timm.is_model(str(name)):
        backbone = _from_timm(str(name), pretrained and weights is None, model_kwargs)
    else:
        raise UserError(_unknown_name_message(str(name)))
    if weights is not None:
        _load_local(backbone, read_state_dict(weights), str(weights), strict)
        backbone.spec = replace(backbone.spec, source=f"weights:{Path(weights).name}")
    if backbone.spec.source == "random":
        _note_random(str(name))
    return backbone


def random_like(spec: BackboneSpec) -> Backbone:
    """A backbone as ``spec`` describes it (name, timm architecture, ``model_kwargs`` and preprocessing:
    mean, std, input size, mpp) with fresh weights from torch's global RNG; ``source`` becomes ``random``.

    The control for a trained model: rebuilding from ``spec.timm_name`` alone would take timm's default
    preprocessing (224 px for a 64-px ``tiny/`` model), so the control would see other input than the
    model it controls for.
    """
    _note_random(spec.name)
    return Backbone(_create(spec.timm_name, spec.model_kwargs), replace(spec, source="random"))


def _note_random(name: str) -> None:
    print(
        f"note: {name}: random initialisation (random weights were asked for), no pretrained weights",
        file=sys.stderr,
    )


# ---- sources ---------------------------------------------------------------------------------------
def _from_entry(name: str, entry: BackboneEntry, pretrained: bool, model_kwargs: dict[str, Any]) -> Backbone:
    _check_requirements(name, entry)
    kwargs = {**entry.model_kwargs, **model_kwargs}
    # Only the caller's img_size changes the input: an entry's own (Kaiko ViT-L/14's 518-px position table)
    # is an architecture argument, its preprocessing stays the published one.
    preprocess = _with_input_size(entry.preprocess, model_kwargs)
    if pretrained and entry.weights_file:
        model, kwargs, source = _from_published_file(name, entry, kwargs, model_kwargs)
    elif pretrained and entry.hub_id:
        model = _create_pretrained(f"hf-hub:{entry.hub_id}", kwargs, name)
        source = f"hf-hub:{entry.hub_id}"
    else:
        model = (
            _create_pretrained(entry.timm_name, kwargs, name)
            if pretrained
            else _create(entry.timm_name, kwargs)
        )
        source = _timm_source(model) if pretrained else "random"
    return Backbone(model, BackboneSpec(name, entry.timm_name, kwargs, preprocess, source, entry.embedding))


def _check_requirements(name: str, entry: BackboneEntry) -> None:
    """Entries only their authors' package builds, and transformers entries without transformers, stop
    here."""
    if entry.requires in PACKAGES:
        raise UserError(
            f"{name} is built by the authors' {entry.requires!r} package ({PACKAGES[entry.requires]}), which "
            "histodistill does not wrap: extract its features with that package (or TRIDENT), or pick "
            "another model (histodistill models)"
        )
    if is_transformers(entry.timm_name):
        from histodistill.models.hf_encoder import require_transformers

        require_transformers(name)


def _from_published_file(
    name: str, entry: BackboneEntry, kwargs: dict[str, Any], model_kwargs: dict[str, Any]
) -> tuple[nn.Module, dict[str, Any], str]:
    """The stated architecture with the published weights file: (model, its arguments, source)."""
    path = _published_file(name, entry, entry.weights_file)
    source = entry.weights_file if "://" in entry.weights_file else f"hf-hub:{entry.hub_id}"
    if is_transformers(entry.timm_name):
        from histodistill.models.hf_encoder import load_hf_encoder

        if entry.hub_config:  # the published architecture, as transformers' from_pretrained would read it
            kwargs = {**json.loads(_published_file(name, entry, "config.json").read_text()), **model_kwargs}
        return (
            load_hf_encoder(entry.timm_name, kwargs, path.parent, f"{entry.hub_id}/{entry.weights_file}"),
            kwargs,
            source,
        )
    model = _create(entry.timm_name, kwargs)
    convert = CONVERTERS.get(entry.timm_name)
    state = read_state_dict(path)
    load_weights(model, convert(state, model) if convert else state, f"{source}/{path.name}")
    return model, kwargs, source


def _published_file(name: str, entry: BackboneEntry, filename: str) -> Path:
    """A file of the entry's hub repository (from the Hugging Face cache or hub), or a URL's download (in
    torch's hub cache); a `UserError` naming the remedies when it cannot be had."""
    if "://" in filename:
        target = Path(torch.hub.get_dir()) / "checkpoints" / filename.rsplit("/", 1)[-1]
        if not target.is_file():
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
                # writes a temporary, then renames
                torch.hub.download_url_to_file(filename, str(target), progress=False)
            except OSError as error:
                raise UserError(
                    f"cannot download the pretrained weights of {name!r} from {filename}: "
                    f"{first_line(error)}. Remedies: a local file (`weights=FILE` with the model {name!r}); "
                    f"or the file at {target}; or `pretrained=False` for random weights"
                ) from error
        return target
    from huggingface_hub import hf_hub_download

    with hub_access() as unreachable:  # one quick probe, not huggingface_hub's ~53 s of retries when offline
        try:
            return Path(hf_hub_download(entry.hub_id, filename, repo_type=entry.repo_type))
        except (OSError, RuntimeError, ValueError) as error:  # hub/network errors are OSError subclasses
            raise UserError(
                _unavailable_message(
                    name, f"hf-hub:{entry.hub_id}", True, error, local=name, unreachable=unreachable
                )
            ) from error


def _load_local(backbone: Backbone, state: dict[str, torch.Tensor], origin: str, strict: bool) -> None:
    """A local weights file into ``backbone``: a registered entry's published layout is converted first
    (transformers' own loader for transformers architectures, which is always strict)."""
    architecture = backbone.spec.timm_name
    if is_transformers(architecture):
        from histodistill.models.hf_encoder import load_hf_encoder

        backbone.model = load_hf_encoder(
            architecture, backbone.spec.model_kwargs, None, origin, state_dict=state
        )
        return
    convert = CONVERTERS.get(architecture)
    state = convert(state, backbone.model) if convert else state
    load_weights(backbone.model, _without_classifier(state, backbone.model), origin, strict)


def _from_timm(name: str, pretrained: bool, model_kwargs: dict[str, Any]) -> Backbone:
    model = _create_pretrained(name, model_kwargs, name) if pretrained else _create(name, model_kwargs)
    preprocess = _with_input_size(_timm_preprocess(model), model_kwargs)
    spec = BackboneSpec(
        name, name, dict(model_kwargs), preprocess, _timm_source(model) if pretrained else "random"
    )
    return Backbone(model, spec)


def _timm_source(model: nn.Module) -> str:
    """``timm:<hub id>`` of the weights timm loaded (e.g. ``timm:timm/resnet18.a1_in1k``)."""
    cfg = model.pretrained_cfg
    return f"timm:{cfg.get('hf_hub_id') or cfg.get('architecture')}"


def _from_hub_id(hub_id: str, pretrained: bool, model_kwargs: dict[str, Any]) -> Backbone:
    # Even with pretrained=False timm reads the architecture from the hub's config.json, so an hf-hub id
    # always needs the hub (or its local cache).
    model = _create_pretrained(hub_id, model_kwargs, hub_id, pretrained=pretrained)
    timm_name = model.pretrained_cfg.get("architecture") or type(model).__name__
    spec = BackboneSpec(
        hub_id, timm_name, dict(model_kwargs), _timm_preprocess(model), hub_id if pretrained else "random"
    )
    return Backbone(model, spec)


def _from_checkpoint(path: Path, model_kwargs: dict[str, Any]) -> Backbone:
    checkpoint = read_checkpoint(path)
    record = checkpoint.get(CHECKPOINT_BACKBONE_KEY)
    if record is None:
        raise UserError(
            f"{path} has no '{CHECKPOINT_BACKBONE_KEY}' record, so it is not a histodistill checkpoint. "
            "For a plain weights file pass the architecture as the model and the file as `weights=FILE`."
        )
    spec = BackboneSpec.from_dict(record["spec"])
    spec = replace(spec, model_kwargs={**spec.model_kwargs, **model_kwargs}, source=f"checkpoint:{path.name}")
    backbone = Backbone(_create(spec.timm_name, spec.model_kwargs), spec)
    load_weights(backbone.model, checkpoint_backbone_state(checkpoint), str(path))
    return backbone


def checkpoint_backbone_state(checkpoint: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The backbone's own weights (keys as in ``Backbone.model``) cut out of a checkpoint's state dict."""
    prefix = checkpoint[CHECKPOINT_BACKBONE_KEY]["state_dict_prefix"]
    state = checkpoint.get("state_dict", {})
    return {key[len(prefix) :]: value for key, value in state.items() if key.startswith(prefix)}


def _from_export(directory: Path, model_kwargs: dict[str, Any]) -> Backbone:
    """Our export (``config.json`` with a ``histodistill`` spec + ``model.safetensors``), loaded strictly with
    our messages; any other timm model folder (``config.json`` + weights, e.g. a downloaded hub snapshot)
    through timm's own ``local-dir:`` loader."""
    config_path, weights_path = directory / EXPORT_CONFIG, directory / EXPORT_WEIGHTS
    if not config_path.is_file():
        raise UserError(
            f"{directory} is a directory but not a model folder: it needs {EXPORT_CONFIG} and "
            f"{EXPORT_WEIGHTS} (made by `histodistill export`, or a timm model folder from the Hugging Face "
            "hub)"
        )
    config = json.loads(config_path.read_text())
    source = f"export:{directory.name}"
    if EXPORT_SPEC_KEY not in config:
        model = _create_pretrained(f"local-dir:{directory}", model_kwargs, str(directory))
        timm_name = model.pretrained_cfg.get("architecture") or type(model).__name__
        spec = BackboneSpec(str(directory), timm_name, dict(model_kwargs), _timm_preprocess(model), source)
        return Backbone(model, spec)
    spec = BackboneSpec.from_dict(config[EXPORT_SPEC_KEY])
    spec = replace(spec, model_kwargs={**spec.model_kwargs, **model_kwargs}, source=source)
    backbone = Backbone(_create(spec.timm_name, spec.model_kwargs), spec)
    load_weights(backbone.model, read_state_dict(weights_path), str(weights_path))
    return backbone


# ---- timm ------------------------------------------------------------------------------------------
def timm_kwargs(model_kwargs: dict[str, Any]) -> dict[str, Any]:
    """``model_kwargs`` as timm wants them: layer classes named by string (JSON) resolved to classes."""
    kwargs = dict(model_kwargs)
    if isinstance(kwargs.get("mlp_layer"), str):
        if kwargs["mlp_layer"] not in _LAYER_NAMES:
            raise UserError(f"model_kwargs.mlp_layer={kwargs['mlp_layer']!r}: use one of {_LAYER_NAMES}")
        kwargs["mlp_layer"] = getattr(timm.layers, kwargs["mlp_layer"])
    return kwargs


def _create(timm_name: str, model_kwargs: dict[str, Any]) -> nn.Module:
    if timm_name in BUILDERS:
        return BUILDERS[timm_name](**timm_kwargs(model_kwargs))
    try:
        return timm.create_model(timm_name, pretrained=False, num_classes=0, **timm_kwargs(model_kwargs))
    except TypeError as error:
        raise UserError(
            f"timm model {timm_name!r} does not accept these arguments {model_kwargs}: {error}"
        ) from error


def _create_pretrained(
    timm_name: str, model_kwargs: dict[str, Any], asked: str, pretrained: bool = True
) -> nn.Module:
    # hf-hub: and local-dir: sources bring their weights; a plain timm name may have none published.
    if pretrained and ":" not in timm_name and not _has_published_weights(timm_name):
        raise UserError(
            f"timm publishes no pretrained weights for {asked!r} ({timm_name}): pass a local file "
            "(`weights=FILE`) or ask for random weights explicitly (`pretrained=False`)"
        )
    with hub_access() as unreachable:  # one quick probe, not huggingface_hub's ~53 s of retries when offline
        try:
            return timm.create_model(
                timm_name, pretrained=pretrained, num_classes=0, **timm_kwargs(model_kwargs)
            )
        except (OSError, RuntimeError, ValueError) as error:  # hub/network errors are OSError subclasses
            message = _unavailable_message(asked, timm_name, pretrained, error, unreachable=unreachable)
            raise UserError(message) from error


def _has_published_weights(timm_name: str) -> bool:
    cfg = timm.models.get_pretrained_cfg(timm_name)
    return cfg is not None and bool(cfg.hf_hub_id or cfg.url or cfg.file)


def _unavailable_message(
    asked: str,
    timm_name: str,
    pretrained: bool,
    error: BaseException,
    local: str | None = None,
    unreachable: str | None = None,
) -> str:
    """One line: which model, why its files could not be had, and every way out (``local``: the model that
    takes a local file, when it is not the asked name or the timm architecture; ``unreachable``: why the hub
    gave no answer, from `histodistill.models.hub.hub_access`)."""
    from huggingface_hub import constants
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError

    hub_id = timm_name.startswith("hf-hub:")
    cfg = None if hub_id else timm.models.get_pretrained_cfg(timm_name)
    where = timm_name.removeprefix("hf-hub:") if cfg is None else cfg.hf_hub_id or cfg.url or timm_name
    what = (
        "pretrained weights" if pretrained else "config.json (an hf-hub: id needs it even for random weights)"
    )
    local = (
        f"the model {local!r}"
        if local
        else "the timm architecture as the model"
        if hub_id
        else f"the model {asked!r}"
    )
    others = f"a local file (`weights=FILE` with {local})" + (
        "; or `pretrained=False` for random weights" if pretrained else ""
    )
    if unreachable is not None and isinstance(error, LocalEntryNotFoundError):
        return (
            f"cannot get the {what} of {asked!r} from {where}: {unreachable_remedy(where, unreachable)}; "
            f"or {others}"
        )
    if isinstance(error, GatedRepoError):
        why = (
            f"it is gated: accept its terms on https://huggingface.co/{where} and log in (`hf auth login` "
            "or HF_TOKEN)"
        )
    elif isinstance(error, RepositoryNotFoundError):
        why = (
            "no such repository on the Hugging Face hub, or a private one (log in: `hf auth login` or "
            "HF_TOKEN)"
        )
    elif isinstance(error, LocalEntryNotFoundError):
        offline = ", HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else ""
        why = f"not in the Hugging Face cache ({constants.HF_HUB_CACHE}){offline} and the hub was not reached"
    else:
        why = f"{type(error).__name__}: {first_line(error)}"
    return (
        f"cannot get the {what} of {asked!r} from {where}: {why}. Remedies: HF_HUB_OFFLINE=1 with a "
        f"populated Hugging Face cache (download {where} where the hub is reachable, copy the cache, point "
        f"HF_HOME or HF_HUB_CACHE at it); or {others}"
    )


def _timm_preprocess(model: nn.Module) -> Preprocess:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return Preprocess(
        mean=tuple(cfg.get("mean", IMAGENET_MEAN)),
        std=tuple(cfg.get("std", IMAGENET_STD)),
        input_size=int(cfg.get("input_size", (3, 224, 224))[-1]),
        mpp=None,
    )


def _with_input_size(preprocess: Preprocess, kwargs: dict[str, Any]) -> Preprocess:
    size = kwargs.get("img_size")
    return preprocess if size is None else replace(preprocess, input_size=int(size))


def _without_classifier(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Drop classifier weights from a full-model file: our models are built with ``num_classes=0``."""
    classifier = (getattr(model, "pretrained_cfg", None) or {}).get("classifier")
    names = classifier if isinstance(classifier, (list, tuple)) else [classifier] if classifier else []
    own = model.state_dict()
    return {
        key: value
        for key, value in state.items()
        if key in own or not any(key.startswith(f"{n}.") for n in names)
    }


def _unknown_name_message(name: str) -> str:
    """Names the closest registered and timm names: substring matches first, then spelling (``resnet-18``)."""
    query = name.lower()
    registered = [n for n in list_backbones() if query in n] or difflib.get_close_matches(
        query, list_backbones(), 3, 0.5
    )
    timm_names = timm.list_models(f"*{query}*")[:5] or difflib.get_close_matches(
        query, timm.list_models(), 5, 0.6
    )
    hints = [f"registered: {', '.join(registered)}"] if registered else []
    hints += [f"timm: {', '.join(timm_names)}"] if timm_names else []
    return (
        f"unknown model {name!r}: not a registered name (list_backbones()), a timm model, an hf-hub: id, "
        f"a .ckpt checkpoint or an exported directory."
        + (f" Closest names: {'; '.join(hints)}." if hints else "")
    )


# ---- registered backbones -------------------------------------------------------------------------
# Small CPU-friendly models at 64 px for tests and the demo (0.5 mpp: a 64-px tile is 32 µm of tissue).
_TINY = Preprocess(IMAGENET_MEAN, IMAGENET_STD, input_size=64, mpp=0.5)
register_backbone("tiny/resnet18-64", BackboneEntry("resnet18", {}, _TINY, description="ResNet-18 at 64 px"))
register_backbone(
    "tiny/resnet34-64", BackboneEntry("resnet34", {}, _TINY, description="ResNet-34 at 64 px (a CPU teacher)")
)
register_backbone(
    "tiny/vit-tiny-p8-64",
    BackboneEntry(
        "vit_tiny_patch16_224",
        {"patch_size": 8, "img_size": 64},
        _TINY,
        description="ViT-Tiny with 8-px patches at 64 px: 64 patch tokens + 1 class token",
    ),
)
register_backbone(
    "tiny/efficientnet-b0-64",
    BackboneEntry("efficientnet_b0", {}, _TINY, description="EfficientNet-B0 at 64 px"),
)


# Pathology foundation models: the table in models/foundation.py, with its sources.
def _entry(model: FoundationModel) -> BackboneEntry:
    return BackboneEntry(
        model.architecture,
        dict(model.model_kwargs),
        model.preprocess,
        model.hub_id,
        f"{model.citation.split(',')[0]}: {model.build}, {model.embedding} {model.dim}-d",
        model.embedding,
        model.weights_file,
        model.repo_type,
        model.hub_config,
        model.requires,
    )


for _model in FOUNDATION_MODELS:
    register_backbone(_model.name, _entry(_model))


def seeded_backbone(
    model: str | os.PathLike, weights: str | os.PathLike | None, pretrained: bool
) -> Backbone:
    """`create_backbone` with torch's generator seeded 0 (then restored): random weights are reproducible."""
    # A randomly initialised model (pretrained=False) must be the same on every run, or a resumed
    # extraction would mix features of two different networks.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return create_backbone(model, pretrained=pretrained, weights=weights)
