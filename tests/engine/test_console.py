"""Lightning's console noise is dropped, its real messages are kept."""

from __future__ import annotations

import logging
import warnings

from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn

from histodistill.engine.console import drop_lightning_adverts, expected_warnings_silenced
from histodistill.methods.sdmae import MAE
from histodistill.methods.supervised import Supervised

NO_VALIDATION = "You passed in a `val_dataloader` but have no `validation_step`. Skipping val loop."


def test_the_litlogger_tip_goes_and_other_info_stays(caplog):
    drop_lightning_adverts()
    with caplog.at_level(logging.INFO):
        rank_zero_info(
            "💡 Tip: For seamless cloud logging and experiment tracking, try installing [litlogger]"
        )
        rank_zero_info("GPU available: False, used: False")
    assert "litlogger" not in caplog.text and "GPU available" in caplog.text


class UsersOwnMethod(Supervised):
    """A user's subclass: the warnings it triggers are about the user's code and must reach them."""

    validation_step = None  # type: ignore[assignment]


def _warnings_while_fitting(model) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with expected_warnings_silenced(model):
            rank_zero_warn(NO_VALIDATION)
            rank_zero_warn("The number of training batches (2) is smaller than the logging interval")
    return [str(w.message) for w in caught]


def test_no_validation_step_is_silenced_only_for_our_pretraining_methods():
    mae = MAE(backbone="tiny/vit-tiny-p8-64", decoder_dim=16, decoder_depth=1, decoder_heads=2)
    assert _warnings_while_fitting(mae) == [
        "The number of training batches (2) is smaller than the logging interval"
    ]
    user = UsersOwnMethod(backbone="tiny/resnet18-64", num_classes=2, pretrained=False)
    assert NO_VALIDATION in _warnings_while_fitting(user)
