"""Train and evaluate a slide-level MIL classifier (ABMIL, TransMIL or mean pooling) with k-fold
cross-validation by case, on features written by `histodistill extract`, CLAM or TRIDENT.

Writes one run directory (--out): config.yaml (the resolved options), metrics.json (AUROC, balanced
accuracy, macro-F1 and accuracy per fold, with mean and sd), metrics.csv (per-epoch losses),
predictions.csv (out-of-fold class probabilities), splits/splits_<k>.csv, checkpoints/ (best model
per fold, safetensors), figures/roc.png, tensorboard/ and attention/ (per-slide instance scores that
`histodistill heatmap` draws).
"""

from __future__ import annotations

import argparse

from histodistill.commands._arguments import output_folder

HELP = "train + evaluate ABMIL / TransMIL / mean-pooling slide classifiers per CV fold"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--features", required=True,
                        help="folder of <slide_id>.h5 features files: from `histodistill extract`, CLAM's feat_dir "
                        "(h5_files/ or pt_files/) or TRIDENT's features_<encoder>/ (or a folder holding one features_*)")
    parser.add_argument("--labels", required=True, help="CSV with columns case_id,slide_id,label (CLAM style)")
    parser.add_argument("--out", required=True, type=output_folder, help="run directory to create")
    parser.add_argument("--model", choices=("abmil", "transmil", "mean"), default="abmil",
                        help="abmil: gated attention (Ilse 2018); transmil: Shao 2021; mean: mean pooling + linear "
                        "(default: %(default)s)")
    parser.add_argument("--hidden-dim", type=int, default=None,
                        help="width of the instance embedding: ABMIL hidden_dim (default 256), TransMIL dim "
                        "(default 512, a multiple of its 8 heads); ignored by mean")
    parser.add_argument("--feature-norm", choices=("standardize", "none"), default="standardize",
                        help="standardize: z-score each feature dimension with the fold's training tiles' mean and sd "
                        "(stored with the model); none: raw features as CLAM and TRIDENT feed them (default: %(default)s)")
    parser.add_argument("--folds", type=int, default=5, help="number of cross-validation folds (default: %(default)s)")
    parser.add_argument("--val-fraction", type=float, default=0.2,
                        help="fraction of each fold's training cases held out for early stopping; 0: none held out, "
                        "every training case trains for --epochs (needs --early-stop none) (default: %(default)s)")
    parser.add_argument("--splits", default=None,
                        help="directory of your own splits_<k>.csv (columns train,val,test of slide ids); "
                        "replaces --folds/--val-fraction")
    parser.add_argument("--drop-empty", action="store_true",
                        help="leave out slides without tissue tiles (features (0, D)) instead of stopping; they are "
                        "listed on screen and in metrics.json under dropped_empty")
    parser.add_argument("--by-case", action="store_true",
                        help="one bag per case (all its slides together) instead of one bag per slide")
    parser.add_argument("--epochs", type=int, default=50, help="maximum epochs per fold (default: %(default)s)")
    parser.add_argument("--lr", type=float, default=2e-4, help="AdamW learning rate (default: %(default)s)")
    parser.add_argument("--weight-decay", type=float, default=1e-4,
                        help="AdamW weight decay on weight matrices (default: %(default)s)")
    parser.add_argument("--early-stop", choices=("val_loss", "val_auroc", "none"), default="val_loss",
                        help="validation metric that picks the best epoch and stops training; none: keep the last "
                        "epoch (default: %(default)s)")
    parser.add_argument("--patience", type=int, default=10,
                        help="epochs without improvement before a fold stops (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=1, help="bags per step, padded with a mask (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed for splits, initialisation and shuffling (default: %(default)s)")
    parser.add_argument("--device", default="auto", help="auto (GPU if visible), cpu, cuda or cuda:N (default: %(default)s)")
    parser.add_argument("--overwrite", action="store_true", help="replace a finished run in --out")


def format_table(summary: dict) -> str:
    """Per-fold metrics and mean ± sd as a plain-text table."""
    from histodistill.eval.mil import REPORTED_METRICS

    header = f"{'fold':>6} " + " ".join(f"{name:>18}" for name in REPORTED_METRICS)
    lines = [header]
    for fold in summary["folds"]:
        lines.append(f"{fold['fold']:>6} " + " ".join(f"{fold[name]:>18.3f}" for name in REPORTED_METRICS))
    lines.append(f"{'mean':>6} " + " ".join(
        f"{summary['mean'][n]:>10.3f} ± {summary['sd'][n]:.3f}" for n in REPORTED_METRICS))
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    import yaml
    from torch.utils.tensorboard import SummaryWriter

    from histodistill.data.bags import (
        BagDataset,
        class_names,
        describe_labels,
        empty_bags,
        empty_bags_error,
        make_bags,
        read_labels,
    )
    from histodistill.data.feature_files import load_slides, open_feature_folder, shown
    from histodistill.data.splits import make_splits, read_splits_dir, write_split
    from histodistill.errors import UserError
    from histodistill.eval import mil, mil_outputs
    from histodistill.io import atomic_path, write_json

    out = Path(args.out)
    if (out / "metrics.json").exists() and not args.overwrite:
        raise UserError(f"{out} already holds a finished MIL run: pass --overwrite or choose another --out")
    # Everything is read and checked before anything is written to --out.
    folder = open_feature_folder(args.features)
    rows = labelled = read_labels(args.labels)
    slides = load_slides(folder, [r.slide_id for r in rows])
    dropped: list[str] = []
    if empty := empty_bags(make_bags(rows, class_names(rows), by_case=args.by_case), slides):
        if not args.drop_empty:
            raise empty_bags_error(empty, folder.describe())
        dropped = [s for bag in empty for s in bag.slide_ids]
        rows = [r for r in rows if r.slide_id not in dropped]
        print(f"--drop-empty: left out {len(dropped)} slide(s) without tissue tiles: {shown(dropped)}")
    classes = class_names(rows)
    print(describe_labels(rows, args.labels))
    if len(classes) < 2:
        raise UserError(f"--labels {args.labels} has a single label {classes}: MIL needs at least two classes")
    dataset = BagDataset(folder, make_bags(rows, classes, by_case=args.by_case), slides)
    if args.splits:
        splits = [{part: [s for s in ids if s not in dropped] for part, ids in split.items()}
                  for split in read_splits_dir(args.splits, labelled)]
    else:
        splits = make_splits(rows, args.folds, args.val_fraction, args.seed)
    model_kwargs = {"standardize": args.feature_norm == "standardize"}
    if args.hidden_dim is not None and args.model != "mean":
        model_kwargs[{"abmil": "hidden_dim", "transmil": "dim"}[args.model]] = args.hidden_dim
    config = mil.TrainConfig(
        epochs=args.epochs, lr=args.lr, weight_decay=args.weight_decay, early_stop=args.early_stop,
        patience=args.patience, batch_size=args.batch_size, seed=args.seed, device=args.device,
        model_kwargs=model_kwargs,
    )
    if config.early_stop != "none":
        mil.check_val_for_early_stop(splits, config.early_stop, args.splits or "--val-fraction 0")
    if config.early_stop == "val_auroc":
        mil.check_val_has_every_class(dataset, splits, len(classes))

    options = {k: v for k, v in vars(args).items() if not k.startswith("_")}
    with atomic_path(out / "config.yaml") as tmp:
        tmp.write_text(yaml.safe_dump(options, sort_keys=False))
    for k, split in enumerate(splits):
        write_split(out / "splits" / f"splits_{k}.csv", split)

    description = {"model": args.model, "in_dim": dataset.feature_dim, "classes": classes,
                   "model_kwargs": config.model_kwargs}
    results = []
    for fold, split in enumerate(splits):
        with SummaryWriter(str(out / "tensorboard" / f"fold_{fold}")) as writer:
            def log(row: dict, writer=writer) -> None:
                for name, value in row.items():
                    if name != "epoch":
                        writer.add_scalar(name.replace("_", "/", 1), value, row["epoch"])

            result = mil.run_fold(fold, dataset, split, args.model, len(classes), config, log)
        print(f"fold {fold}: best epoch {result.best_epoch}, test AUROC {result.metrics['auroc']:.3f}")
        mil_outputs.save_model(out, result, description)
        results.append(result)

    summary = mil.summarise(results)
    write_json(out / "metrics.json", {"model": args.model, "classes": classes, "dropped_empty": dropped} | summary)
    mil_outputs.write_history(out / "metrics.csv", results)
    mil_outputs.write_predictions(out / "predictions.csv", results, classes, "case_id" if args.by_case else "slide_id")
    if without_coords := mil_outputs.write_attention(out, dataset, results, classes):
        print(f"no attention files for {len(without_coords)} slide(s) whose features have no coords "
              f"(CLAM pt_files): {shown(without_coords)}; pass CLAM's h5_files for heatmaps")
    mil_outputs.plot_roc(out / "figures" / "roc.png", results, classes)
    print(format_table(summary))
    print(f"run directory: {out}")
    return 0
