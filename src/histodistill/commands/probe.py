"""Evaluate frozen patch features with a linear probe and a kNN probe.

Input: features.h5 files from `histodistill extract --images` (features, labels, paths, classes), or a
folder of per-slide features (ours, CLAM's, TRIDENT's) with a case_id,slide_id,label CSV: each slide is
the mean of its tile features, and cross-validation keeps a case's slides in one part.
Either --features FILE_OR_DIR (stratified k-fold cross-validation, reshuffled per seed) or
--train FILE --test FILE (one fit per seed). Linear: logistic regression on standardised features,
C by 3-fold inner CV over 1e-3..10 unless --C is given. kNN: cosine similarity, the k nearest vote with
weight exp(sim/T) (DINO). --linear-protocol mae swaps the linear probe for MAE's / SD-MAE's own
(BatchNorm1d(affine=False) + Linear, SGD lr 0.1 x B/256, 90 epochs, 10 warm-up). Writes OUT/probe.json (per-run metrics, mean, sd) and
OUT/confusion_{linear,knn}.png.
"""

from __future__ import annotations

import argparse

from histodistill.commands._arguments import output_folder

HELP = "linear and kNN probes on frozen patch features (accuracy, balanced accuracy, F1, AUROC, kappa)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--features", metavar="FILE_OR_DIR",
                        help="a features.h5 (or its folder) to cross-validate on")
    source.add_argument("--train", metavar="FILE_OR_DIR", help="training features.h5 (needs --test)")
    parser.add_argument("--test", metavar="FILE_OR_DIR", help="test features.h5 (with --train)")
    parser.add_argument("--labels", metavar="CSV",
                        help="optional CSV with columns path,label that replaces the labels stored in the "
                             "features file and keeps only the listed patches (paths as stored, relative to the image root)")
    parser.add_argument("--out", required=True, type=output_folder, metavar="DIR", help="where probe.json and the confusion PNGs go")
    parser.add_argument("--folds", type=int, default=5, help="cross-validation folds with --features (default 5)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                        help="seeds: fold shuffles and the linear probe's inner CV (default 0 1 2)")
    parser.add_argument("--C", type=float, default=None,
                        help="fixed inverse regularisation of the linear probe (default: chosen by inner CV)")
    parser.add_argument("--linear-protocol", choices=("sklearn", "mae"), default="sklearn",
                        help="sklearn: logistic regression with C by inner CV; mae: the MAE/SD-MAE linear probe "
                             "(BatchNorm1d(affine=False) + Linear, SGD, 90 epochs; default sklearn)")
    parser.add_argument("--k", type=int, default=20, help="neighbours in the kNN vote (default 20)")
    parser.add_argument("--temperature", type=float, default=0.07,
                        help="kNN vote temperature T: weight exp(cosine/T) (default 0.07, as DINO)")


def run(args: argparse.Namespace) -> int:
    from histodistill.errors import UserError
    from histodistill.eval.probe import evaluate_probes, load_patch_features

    if args.train and not args.test:
        raise UserError("--train needs --test (or use --features for cross-validation)")
    if args.test and not args.train:
        raise UserError("--test needs --train")
    if args.labels and args.train:
        raise UserError("--labels works with --features only; relabel the train and test files separately")
    data = load_patch_features(args.features or args.train, args.labels)
    test = load_patch_features(args.test) if args.test else None
    results = evaluate_probes(data, args.out, test=test, seeds=tuple(args.seeds), folds=args.folds, C=args.C,
                              k=args.k, temperature=args.temperature, linear_protocol=args.linear_protocol)
    for name in ("linear", "knn"):
        mean, std = results[name]["mean"], results[name]["std"]
        print(f"{name:6s} " + "  ".join(f"{m} {mean[m]:.3f}±{std[m]:.3f}" for m in sorted(mean)))
    return 0
