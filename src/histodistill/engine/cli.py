"""`histodistill fit`: LightningCLI wired to histodistill's run directory.

The YAML gives ``model`` and ``data`` as ``class_path`` + ``init_args`` (any `MethodModule` and any
LightningDataModule), ``trainer`` as Lightning's Trainer arguments and ``seed_everything``; any key
can be overridden on the command line (``--trainer.max_epochs 3``). What this adds to LightningCLI:
a default run directory (``runs/<config stem>``), loggers and callbacks by default (CSV,
TensorBoard, last/best checkpoints, metrics.json; see `histodistill.engine.run_dir`), the resolved
config saved atomically as ``<run dir>/config.yaml``, ``--resume`` and ``--overwrite``, a test
pass on the best checkpoint when the data module has a test set, and errors in the user's keys: a
`UserError` raised while a module is built or trained names its parameter (`` `mask_ratio=1.5` ``, see
`histodistill.errors`) and is printed as the key to change (``--model.init_args.mask_ratio 1.5``).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import lightning as L
from jsonargparse import Namespace
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback

from histodistill.engine.callbacks import AtomicCheckpointIO
from histodistill.engine.console import drop_lightning_adverts, expected_warnings_silenced
from histodistill.engine.run_dir import (
    check_run_dir,
    default_callbacks,
    default_loggers,
    default_run_dir,
    resuming_a_checkpoint_that_fits,
)
from histodistill.errors import Flag, UserError, rendering_parameters
from histodistill.io import atomic_path, reporting_full_disk
from histodistill.methods.base import MethodModule

# Our own flags: not Trainer or model arguments, so left out of the saved config.
RUN_FLAGS = ("resume", "overwrite")


class SaveRunConfig(SaveConfigCallback):
    """Write the resolved config to ``<run dir>/config.yaml`` (atomically, rank zero only)."""

    def __init__(self, parser, config, **kwargs) -> None:
        super().__init__(parser, config, save_to_log_dir=False, **kwargs)

    def save_config(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        config = self.config.clone()
        for flag in RUN_FLAGS:
            config.pop(flag, None)
        text = self.parser.dump(config, skip_none=False)
        with atomic_path(Path(trainer.default_root_dir) / "config.yaml") as tmp:
            tmp.write_text(text)


class HistodistillCLI(LightningCLI):
    """Parses and instantiates; `fit_main` runs. ``self.ckpt_path`` is the checkpoint to resume from."""

    def __init__(self, args: list[str]) -> None:
        self.ckpt_path: Path | None = None
        super().__init__(
            model_class=MethodModule,
            datamodule_class=L.LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            save_config_callback=SaveRunConfig,
            save_config_kwargs={"overwrite": True},
            parser_kwargs={
                "prog": "histodistill fit",
                "description": "Train a method (supervised, KD, MoMA, SD-MAE, MCM-KD) from a YAML recipe. "
                "Every option below can be set in the YAML or overridden here as --key value. "
                "Writes one run directory (trainer.default_root_dir, default runs/<config stem>) with "
                "config.yaml, metrics.csv, metrics.json, tensorboard/, checkpoints/ and figures/.",
            },
            args=args,
            run=False,
        )

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--resume",
            action="store_true",
            help="continue the run in trainer.default_root_dir from its checkpoints/last.ckpt "
            "(weights, optimiser, schedule, epoch and step).",
        )
        parser.add_argument(
            "--overwrite",
            action="store_true",
            help="start again in a run directory that already holds checkpoints (they are replaced).",
        )

    def before_instantiate_classes(self) -> None:
        config = self.config
        if config.trainer.default_root_dir is None:
            config.trainer.default_root_dir = str(default_run_dir(config.get("config")))
        with rendering_parameters(config_flags(config)):
            self.ckpt_path = check_run_dir(config.trainer.default_root_dir, config.resume, config.overwrite)

    def instantiate_classes(self) -> None:
        # jsonargparse wraps what a class raises while it is built (e.g. a model whose pretrained weights
        # cannot be had, a ConfigError) in a ValueError listing the Union's subtypes; the user needs our one
        # line.
        with rendering_parameters(config_flags(self.config)):
            try:
                super().instantiate_classes()
            except ValueError as error:
                cause = _user_error_in(error)
                if cause is None:
                    raise
                raise cause from None

    def _instantiate_trainer(self, config: dict, callbacks: list[L.Callback]) -> L.Trainer:
        run_dir = Path(config["default_root_dir"])
        if config.get("logger") in (None, True):
            config["logger"] = default_loggers(run_dir)
        if not config.get("plugins"):
            config["plugins"] = [AtomicCheckpointIO()]
        return super()._instantiate_trainer(config, [*callbacks, *default_callbacks(self.model, run_dir)])


def fit_main(argv: list[str]) -> int:
    """Parse ``argv`` (the arguments after ``histodistill fit``), train, test when there is a test set."""
    drop_lightning_adverts()
    with warnings.catch_warnings():
        # We are the command line: `histodistill fit ARGS` hands ARGS over, so sys.argv differing is expected.
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
        try:
            cli = HistodistillCLI(argv)
        except UnicodeDecodeError:
            # jsonargparse reports missing and malformed config files itself, but not binary ones.
            configs = [argv[i + 1] for i, arg in enumerate(argv[:-1]) if arg == "--config"]
            raise UserError(
                f"--config {' '.join(configs)}: not a YAML text file (UTF-8); pass a recipe such as "
                "configs/supervised/tiny_cpu.yaml"
            ) from None
    trainer, model, datamodule = cli.trainer, cli.model, cli.datamodule
    resume = (
        "add --resume to continue from checkpoints/last.ckpt (or --overwrite to start again if there is none)"
    )
    with (
        rendering_parameters(config_flags(cli.config)),
        reporting_full_disk(trainer.default_root_dir, lambda: checkpoint_space(model), resume),
    ):
        with expected_warnings_silenced(model), resuming_a_checkpoint_that_fits(cli.ckpt_path):
            trainer.fit(model, datamodule=datamodule, ckpt_path=cli.ckpt_path)
        if getattr(datamodule, "datasets", {}).get("test") is not None:
            trainer.test(model, datamodule=datamodule, ckpt_path=_best_checkpoint(trainer))
    return 0


def config_flags(config: Namespace) -> dict[str, Flag]:
    """fit's `Flag` of each parameter (`histodistill.errors.rendering_parameters`): a model or data init
    argument as its key, ``mask_ratio`` -> ``--model.init_args.mask_ratio`` (a nested one under its own name,
    ``lr`` -> ``--model.init_args.optim.lr``; a name found twice is the shallower key's, then the model's),
    and the run flags (``overwrite=True`` -> ``--overwrite``)."""
    flags = {f"{flag}=True": Flag(f"--{flag}", switch=True) for flag in RUN_FLAGS}
    keys = []
    for group in ("model", "data"):
        if isinstance(init_args := config.get(f"{group}.init_args"), Namespace):
            # A jsonargparse Namespace is not iterable; keys() gives the leaves' dotted keys.
            keys += [f"{group}.init_args.{key}" for key in init_args.keys()]  # noqa: SIM118
    for key in sorted(keys, key=lambda key: key.count(".")):  # stable: model before data at each depth
        flags.setdefault(key.rsplit(".", 1)[-1], Flag(f"--{key}"))
    return flags


def checkpoint_space(model: L.LightningModule) -> int:
    """Bytes the run's checkpoints need, an estimate: last.ckpt holds the weights and about two optimiser
    states as large (Adam's moments), each best-<name>.ckpt the weights alone (`default_callbacks`)."""
    weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    return weights * (3 + len(getattr(model, "checkpoint_monitors", {})))


def _user_error_in(error: BaseException) -> UserError | None:
    """The `UserError` that ``error`` was raised from, if any (following ``__cause__``/``__context__``)."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, UserError):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def _best_checkpoint(trainer: L.Trainer) -> str | None:
    """The best checkpoint of the first monitored metric (None: test the weights as they are)."""
    for callback in trainer.checkpoint_callbacks:
        if isinstance(callback, ModelCheckpoint) and callback.monitor and callback.best_model_path:
            return callback.best_model_path
    return None
