"""A Hugging Face model card (``README.md``) for an exported backbone: the fields a reader of a shared
model needs (architecture and preprocessing, training recipe, data, metrics, licence) and how to load it.

Recipe and data are the ``model`` and ``data`` sections of the run's ``config.yaml``, metrics its
``metrics.json`` (both found beside ``<run>/checkpoints/``); a field whose source is missing says so
rather than being left out, so a card never looks more complete than it is.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from histodistill.io import atomic_path
from histodistill.models.backbones import Backbone

MODEL_CARD = "README.md"


def write_model_card(out_dir: Path, backbone: Backbone, checkpoint: Path, license_id: str) -> Path:
    """Write ``out_dir/README.md`` for ``backbone`` exported from ``checkpoint``; returns its path."""
    run_dir = checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else checkpoint.parent
    config = _read(run_dir / "config.yaml", yaml.safe_load)
    metrics = _read(run_dir / "metrics.json", json.loads)
    path = out_dir / MODEL_CARD
    with atomic_path(path) as tmp:
        tmp.write_text(
            model_card_text(out_dir.name, backbone, checkpoint, config, metrics, license_id, run_dir)
        )
    return path


def model_card_text(
    name: str,
    backbone: Backbone,
    checkpoint: Path,
    config: dict | None,
    metrics: dict | None,
    license_id: str,
    run_dir: Path,
) -> str:
    spec, pre = backbone.spec, backbone.spec.preprocess
    mpp = f"{pre.mpp} µm/px" if pre.mpp is not None else "unknown"
    lines = [
        "---",
        "library_name: timm",
        f"license: {license_id}",
        "pipeline_tag: image-feature-extraction",
        "tags: [image-feature-extraction, timm, histopathology, histodistill]",
        "---",
        f"# {name}",
        "",
        f"A feature backbone exported by histodistill from `{checkpoint.name}` of the run `{run_dir.name}`.",
        "",
        "## Model",
        f"- Architecture: timm `{spec.timm_name}` with `{json.dumps(spec.model_kwargs)}`, no classifier",
        f"- Output: {backbone.num_features}-d pooled features",
        f"- Input: {pre.input_size} px tiles at {mpp}, normalised with mean {list(pre.mean)}, std "
        f"{list(pre.std)}",
        f"- Weights: {spec.source}",
        "",
        "## Training recipe",
        *_yaml_block((config or {}).get("model"), run_dir / "config.yaml"),
        "",
        "## Data",
        *_yaml_block((config or {}).get("data"), run_dir / "config.yaml"),
        "",
        "## Metrics",
        *_metric_rows(metrics, run_dir / "metrics.json"),
        "",
        "## Licence",
        f"`{license_id}`. The licences of the training data and of any starting or teacher weights apply "
        "too.",
        "",
        "## Usage",
        "```python",
        "import timm",
        f'model = timm.create_model("local-dir:{name}", pretrained=True).eval()  # or "hf-hub:<org>/{name}"',
        "config = timm.data.resolve_data_config({}, model=model)",
        "transform = timm.data.create_transform(**config)  # resize + centre crop, mean/std as trained",
        "features = model(transform(image).unsqueeze(0))  # (1, D)",
        "```",
        "",
    ]
    return "\n".join(lines)


def _read(path: Path, parse) -> Any:
    return parse(path.read_text()) if path.is_file() else None


def _yaml_block(section: Any, source: Path) -> list[str]:
    if section is None:
        return [f"Not recorded: {source} was not found."]
    return ["```yaml", yaml.safe_dump(section, sort_keys=False).rstrip(), "```"]


def _metric_rows(metrics: dict | None, source: Path) -> list[str]:
    if not metrics:
        return [f"Not recorded: {source} was not found."]
    rows = ["| metric | value |", "|---|---|"]
    for group in ("final", "test"):
        rows += [
            f"| {name} | {value:.4g} |" for name, value in metrics.get(group, {}).items() if value is not None
        ]
    for monitor, best in metrics.get("best", {}).items():
        if best.get("value") is not None:
            rows.append(f"| best {monitor} | {best['value']:.4g} |")
    return rows
