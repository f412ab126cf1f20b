"""Training a recipe (configs/<method>/<recipe>.yaml, or a YAML file) from a pipeline: the same code
`histodistill fit` runs (`histodistill.engine.cli.fit_main`: LightningCLI builds the method, the data module
and the Trainer), with the pipeline's overrides, resuming an interrupted run from its last checkpoint.
`class_spec` names a class in those overrides as the recipes do (``class_path`` + ``init_args``)."""

from __future__ import annotations

import json
from pathlib import Path

import histodistill
from histodistill.errors import UserError


def configs_dir() -> Path:
    """The repository's configs/ (pipelines run from a source checkout: `pip install -e .`)."""
    path = Path(histodistill.__file__).resolve().parents[2] / "configs"
    if not path.is_dir():
        raise UserError(
            f"the pipeline needs the recipes in configs/, expected at {path}: run it from a clone of the "
            "repository installed with `pip install -e .`"
        )
    return path


def class_spec(cls: type, **init_args) -> dict:
    """``{"class_path": ..., "init_args": init_args}``: ``cls`` as a recipe names it, its path taken from the
    class itself (an override then fails at import, not at a typo'd string). ``json.dumps`` it for
    `fit_recipe`."""
    return {"class_path": f"{cls.__module__}.{cls.__qualname__}", "init_args": init_args}


def recipe_model(path: Path) -> str:
    """The ``model.class_path`` a recipe file fits; raises `UserError` for a file that is not a recipe."""
    import yaml

    try:
        recipe = yaml.safe_load(Path(path).read_text())
        return str(recipe["model"]["class_path"])
    except (OSError, yaml.YAMLError, TypeError, KeyError) as error:
        raise UserError(
            f"{path} is not a fit recipe (YAML with model.class_path: {error!r}): see configs/"
        ) from None


def fit_recipe(
    recipe: str | Path, run_dir: Path, overrides: list[str], device: str, devices: int = 1
) -> dict:
    """`histodistill fit --config configs/<recipe>` (or ``--config recipe`` for an absolute path) with
    ``overrides`` into ``run_dir``, on ``device`` (``cpu``:
    32-bit; ``cuda``: bf16-mixed, ``devices`` GPUs, DDP when more than one); returns its metrics.json. A run
    directory holding ``checkpoints/last.ckpt`` is resumed from it (Lightning ``ckpt_path``) instead of
    started again."""
    from histodistill.engine.cli import fit_main
    from histodistill.engine.run_dir import last_checkpoint

    argv = [
        "--config",
        str(configs_dir() / recipe),
        "--trainer.default_root_dir",
        str(run_dir),
        "--trainer.enable_model_summary",
        "false",
    ]
    if device == "cuda":
        argv += [
            "--trainer.accelerator",
            "gpu",
            "--trainer.precision",
            "bf16-mixed",
            "--trainer.devices",
            str(devices),
        ]
        if devices > 1:
            argv += ["--trainer.strategy", "ddp"]
    else:
        argv += ["--trainer.accelerator", "cpu", "--trainer.precision", "32", "--trainer.devices", "1"]
    argv += overrides
    argv.append("--resume" if last_checkpoint(run_dir).is_file() else "--overwrite")
    fit_main(argv)
    return json.loads((run_dir / "metrics.json").read_text())
