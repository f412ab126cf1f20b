"""`histodistill fit --config FILE [--key value ...] [--resume]`: train any method from a YAML recipe.

The arguments go straight to LightningCLI (see `histodistill.engine.cli`); `histodistill fit --help`
lists every option of the trainer, the model and the data module.
"""

from __future__ import annotations

PASSTHROUGH = True
HELP = "train a method from a YAML recipe (supervised, KD, MoMA, SD-MAE, MCM-KD); --resume continues a run"


def main(argv: list[str]) -> int:
    from histodistill.engine.cli import fit_main

    return fit_main(argv)
