"""Recipes from a pipeline: classes named from themselves, a recipe's model read, MCM-KD's option names."""

from __future__ import annotations

import importlib
import typing

import pytest

from histodistill.errors import UserError
from histodistill.pipelines.recipes import class_spec, configs_dir, recipe_model


def test_class_spec_names_a_class_by_a_path_that_imports_back_to_it():
    from lightning.pytorch.callbacks import ModelCheckpoint

    from histodistill.data.datasets import CsvDataset

    for cls in (CsvDataset, ModelCheckpoint):
        spec = class_spec(cls, root="x")
        module, _, name = spec["class_path"].rpartition(".")
        assert getattr(importlib.import_module(module), name) is cls and spec["init_args"] == {"root": "x"}


def test_recipe_model_reads_the_class_a_recipe_fits_and_refuses_other_yaml(tmp_path):
    from histodistill.methods.mcmkd import MCMKD

    assert recipe_model(configs_dir() / "mcmkd" / "tiny_cpu.yaml") == class_spec(MCMKD)["class_path"]
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(UserError, match=r"list.yaml is not a fit recipe"):
        recipe_model(tmp_path / "list.yaml")


def test_distill_offers_exactly_mcmkds_target_norms_and_losses():
    """DistillConfig names them without importing torch (the command's options); they must stay MCM-KD's."""
    from histodistill.losses.masked_context import LossKind, TargetNorm
    from histodistill.pipelines.distill_config import MCMKD_LOSSES, TARGET_NORMS

    assert typing.get_args(TargetNorm) == TARGET_NORMS and typing.get_args(LossKind) == MCMKD_LOSSES
