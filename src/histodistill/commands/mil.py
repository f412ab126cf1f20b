"""Train and evaluate a slide-level MIL classifier (ABMIL, TransMIL, CLAM-SB/MB or mean pooling) with k-fold
cross-validation by case, repeated over --seeds CV seeds, on features written by `histodistill extract`,
CLAM or TRIDENT.

Prints the pooled out-of-fold AUROC [95 % bootstrap CI] over all slides first, then per-fold numbers
("n/a" for a test fold with one class). Writes one run directory (--out): config.yaml, metrics.json
(pooled, then per fold), metrics.csv (per-epoch losses), predictions.csv (out-of-fold class
probabilities), splits/splits_<k>.csv, checkpoints/ (the kept model per fold, safetensors),
figures/roc.png, tensorboard/ and attention/ (per-slide instance scores that `histodistill heatmap`
draws); with --seeds N > 1, each seed's run is <out>/seed_<s>/ and <out> holds the pooled files.
"""

from __future__ import annotations

import argparse

from histodistill.commands._arguments import output_folder
from histodistill.eval.mil_config import (
    EARLY_STOP,
    MIL_MODEL_NAMES,
    VAL_FRACTION_FOR_EARLY_STOP,
    CVConfig,
    TrainConfig,
)

HELP = "k-fold CV by case of ABMIL / TransMIL / CLAM / mean-pooling slide classifiers: pooled AUROC [95 % CI]"
# The width option's name in each model (mean pooling has none).
WIDTH = {"abmil": "hidden_dim", "transmil": "dim", "clam_sb": "hidden_dim", "clam_mb": "hidden_dim"}
PARAMETERS = {"splits_dir": "splits"}  # `cross_validate`'s parameters whose option has another dest


def add_arguments(parser: argparse.ArgumentParser) -> None:
    cv, train = CVConfig(), TrainConfig()
    parser.add_argument(
        "--features",
        required=True,
        help="folder of <slide_id>.h5 features files: from `histodistill extract`, CLAM's feat_dir "
        "(h5_files/ or pt_files/) or TRIDENT's features_<encoder>/ (or a folder holding one features_*)",
    )
    parser.add_argument(
        "--labels", required=True, help="CSV with columns case_id,slide_id,label (CLAM style)"
    )
    parser.add_argument("--out", required=True, type=output_folder, help="run directory to create")
    parser.add_argument(
        "--model",
        choices=MIL_MODEL_NAMES,
        default=cv.model,
        help="abmil: gated attention (Ilse 2018); transmil: Shao 2021; mean: mean pooling + linear; "
        "clam_sb / clam_mb: CLAM single / multi-branch with its instance clustering loss (Lu 2021) "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--hidden-dim",
        type=int,
        default=None,
        help="width of the instance embedding: ABMIL hidden_dim (default 256), TransMIL dim "
        "(default 512, a multiple of its 8 heads), CLAM (default 512); ignored by mean",
    )
    parser.add_argument(
        "--k-sample",
        type=int,
        default=None,
        help="CLAM: tiles of highest and of lowest attention per bag that its instance loss pseudo-labels "
        "(CLAM's B; default 8)",
    )
    parser.add_argument(
        "--bag-weight",
        type=float,
        default=None,
        help="CLAM: weight of the bag cross-entropy; the instance loss gets 1 - it (default 0.7)",
    )
    parser.add_argument(
        "--subtyping",
        action="store_true",
        help="CLAM: also push each other class's top-k tiles to negative (as CLAM's subtyping flag, for "
        "subtype tasks where every class is tumour)",
    )
    parser.add_argument(
        "--feature-norm",
        choices=("standardize", "none"),
        default=train.feature_norm,
        help="standardize: z-score each feature dimension with the fold's training tiles' mean and sd "
        "(stored with the model); none: raw features as CLAM and TRIDENT feed them (default: %(default)s)",
    )
    parser.add_argument(
        "--folds", type=int, default=cv.folds, help="number of cross-validation folds (default: %(default)s)"
    )
    parser.add_argument(
        "--seeds",
        type=int,
        default=cv.seeds,
        help="CV repeats: seed s = --seed + i splits the cases anew (the same folds for any features "
        "folder) and initialises the models; the pooled AUROC is the mean over seeds "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--val-fraction",
        type=float,
        default=cv.val_fraction,
        help="fraction of each fold's training cases held out for validation (default: "
        f"{VAL_FRACTION_FOR_EARLY_STOP} with --early-stop, else 0: every training case trains)",
    )
    parser.add_argument(
        "--splits",
        default=None,
        help="directory of your own splits_<k>.csv (columns train,val,test of slide ids); "
        "replaces --folds/--val-fraction",
    )
    parser.add_argument(
        "--drop-empty",
        action="store_true",
        help="leave out slides without tissue tiles (features (0, D)) instead of stopping; they are "
        "listed on screen and in metrics.json under dropped_empty",
    )
    parser.add_argument(
        "--by-case",
        action="store_true",
        help="one bag per case (all its slides together) instead of one bag per slide",
    )
    parser.add_argument(
        "--epochs", type=int, default=train.epochs, help="epochs per fold (default: %(default)s)"
    )
    parser.add_argument(
        "--lr", type=float, default=train.lr, help="AdamW learning rate (default: %(default)s)"
    )
    parser.add_argument(
        "--weight-decay",
        type=float,
        default=train.weight_decay,
        help="AdamW weight decay on weight matrices (default: %(default)s)",
    )
    parser.add_argument(
        "--early-stop",
        choices=EARLY_STOP,
        default=train.early_stop,
        help="none: train every fold --epochs and keep the last (measured better on small cohorts, "
        "docs/mil.md); val_loss / val_auroc: keep the best epoch on a validation part and stop after "
        "--patience epochs without improvement (default: %(default)s)",
    )
    parser.add_argument(
        "--patience",
        type=int,
        default=train.patience,
        help="with --early-stop: epochs without improvement before a fold stops (default: %(default)s)",
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=train.batch_size,
        help="bags per step, padded to the longest with a mask; the loss is their mean, so an epoch "
        "takes ceil(n/B) AdamW steps instead of n: B > 1 changes the optimisation (lr may need "
        "scaling; docs/mil.md, 'Several bags per step') (default: %(default)s)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=train.seed,
        help="first CV seed: splits, initialisation and shuffling (default: %(default)s)",
    )
    parser.add_argument(
        "--one-at-a-time",
        action="store_true",
        help="train the folds x seeds one after another instead of together as one stacked model "
        "(the same results, slower; TransMIL and CLAM-MB always train one at a time)",
    )
    parser.add_argument(
        "--device",
        default=train.device,
        help="auto (GPU if visible), cpu, cuda or cuda:N (default: %(default)s)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace a finished run in --out")


def config_from(args: argparse.Namespace) -> CVConfig:
    """The `CVConfig` the options describe; CLAM's options with another model are a `UserError`."""
    from histodistill.errors import UserError

    model_kwargs = {}
    if args.hidden_dim is not None and args.model in WIDTH:
        model_kwargs[WIDTH[args.model]] = args.hidden_dim
    clam = {"k_sample": args.k_sample, "bag_weight": args.bag_weight, "subtyping": args.subtyping or None}
    if given := [name for name, value in clam.items() if value is not None]:
        if not args.model.startswith("clam"):
            flags = ", ".join("--" + name.replace("_", "-") for name in given)
            raise UserError(
                f"{flags}: CLAM's options, but --model is {args.model}; pass --model clam_sb or clam_mb"
            )
        model_kwargs |= {name: clam[name] for name in given}
    train = TrainConfig(
        epochs=args.epochs,
        lr=args.lr,
        weight_decay=args.weight_decay,
        early_stop=args.early_stop,
        patience=args.patience,
        batch_size=args.batch_size,
        seed=args.seed,
        device=args.device,
        feature_norm=args.feature_norm,
        model_kwargs=model_kwargs,
    )
    return CVConfig(
        model=args.model,
        folds=args.folds,
        seeds=args.seeds,
        val_fraction=args.val_fraction,
        by_case=args.by_case,
        drop_empty=args.drop_empty,
        batched=not args.one_at_a_time,
        train=train,
    )


def run(args: argparse.Namespace) -> int:
    from histodistill.errors import render_parameters
    from histodistill.eval.mil_cv import cross_validate, report_lines

    # Errors are rendered by the CLI (`histodistill.cli`); the progress and warning lines here.
    result = cross_validate(
        args.features,
        args.labels,
        args.out,
        config_from(args),
        splits_dir=args.splits,
        overwrite=args.overwrite,
        log=lambda line: print(render_parameters(line, args._flags)),
    )
    print("\n".join(report_lines(result)))
    print(f"run directory: {args.out}")
    return 0
