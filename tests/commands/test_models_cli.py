"""`histodistill models` lists every registered foundation model with what it gives and needs."""

from __future__ import annotations

from histodistill.cli import main
from histodistill.models.foundation import FOUNDATION_MODELS


def test_models_lists_every_entry_with_dim_mpp_input_gating_and_needs(capsys):
    assert main(["models"]) in (0, None)
    lines = {
        line.split()[0]: line.split()
        for line in capsys.readouterr().out.splitlines()
        if line.startswith("pathology/")
    }
    assert set(lines) == {model.name for model in FOUNDATION_MODELS}
    assert lines["pathology/virchow2"][1:7] == ["cls+mean_patch", "2560", "224", "px", "0.5", "yes"]
    assert lines["pathology/phikon"][7] == "histodistill[hf]" and lines["pathology/conch-v1"][7] == "conch"
    assert lines["pathology/ctranspath"][5] == "1.0"
