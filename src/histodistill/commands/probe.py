"""Evaluate frozen patch features with a linear probe and a kNN probe.

Input: features.h5 files from `histodistill extract --images` (features, labels, paths, classes), or a
folder of per-slide features (ours, CLAM's, TRIDENT's) with a case_id,slide_id,label CSV: each slide is
the mean of its tile features, and cross-validation keeps a case's slides in one part.
Either --features FILE_OR_DIR (stratified k-fold cross-validation, reshuffled per seed) or
--train FILE --test FILE (one fit per seed). Linear: logistic regression on standardised features,
C by 3-fold inner CV over 1e-3..10 unless --C is given. kNN: cosine similarity, the k nearest vote with
weight exp(sim/T) (DINO). --linear-protocol mae swaps the linear probe for MAE's / SD-MAE's own
(BatchNorm1d(affine=False) + Linear, SGD lr 0.1 x B/256, --epochs 90 with 10 warm-up, --batch-size 512:
the defaults of main_linprobe.py and run_mae_eval_linear.py).
--train-images DIR --test-images DIR --model M --linear-protocol mae is that probe as the official code runs
it: on image folders (DIR/<class>/<image>) through the frozen --model, each training image freshly
augmented every epoch (RandomResizedCrop bicubic + horizontal flip), test images resized and centre-cropped;
the kNN probe uses the eval-transform features of both folders. Writes OUT/probe.json (per-run metrics,
mean, sd) and OUT/confusion_{linear,knn}.png.
"""

from __future__ import annotations

import argparse

from histodistill.commands._arguments import add_model_arguments, check_model_arguments, output_folder

HELP = (
    "linear and kNN probes on frozen patch features, or MAE's linear probe on augmented image folders "
    "(accuracy, balanced accuracy, F1, AUROC, kappa)"
)
# Library parameters passed by options of other names (`histodistill.errors`).
PARAMETERS = {
    "labels_csv": "labels",
    "train_dir": "train_images",
    "test_dir": "test_images",
    "out_dir": "out",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--features", metavar="FILE_OR_DIR", help="a features.h5 (or its folder) to cross-validate on"
    )
    source.add_argument("--train", metavar="FILE_OR_DIR", help="training features.h5 (needs --test)")
    parser.add_argument("--test", metavar="FILE_OR_DIR", help="test features.h5 (with --train)")
    source.add_argument(
        "--train-images",
        metavar="DIR",
        help="training image folder DIR/<class>/<image> for the MAE probe with per-image augmentation "
        "(needs --test-images, --model and --linear-protocol mae)",
    )
    parser.add_argument(
        "--test-images", metavar="DIR", help="test image folder (with --train-images), same classes"
    )
    add_model_arguments(parser, required=False)
    parser.add_argument(
        "--labels",
        metavar="CSV",
        help="optional CSV with columns path,label that replaces the labels stored in the "
        "features file and keeps only the listed patches (paths as stored, relative to the image root)",
    )
    parser.add_argument(
        "--out",
        required=True,
        type=output_folder,
        metavar="DIR",
        help="where probe.json and the confusion PNGs go",
    )
    parser.add_argument(
        "--folds", type=int, default=5, help="cross-validation folds with --features (default 5)"
    )
    parser.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=[0, 1, 2],
        help="seeds: fold shuffles and the linear probe's inner CV (default 0 1 2)",
    )
    parser.add_argument(
        "--C",
        type=float,
        default=None,
        help="fixed inverse regularisation of the linear probe (default: chosen by inner CV)",
    )
    parser.add_argument(
        "--linear-protocol",
        choices=("sklearn", "mae"),
        default="sklearn",
        help="sklearn: logistic regression with C by inner CV; mae: the MAE/SD-MAE linear probe "
        "(BatchNorm1d(affine=False) + Linear, SGD, 90 epochs; default sklearn)",
    )
    parser.add_argument(
        "--epochs",
        type=int,
        default=None,
        help="--linear-protocol mae: training epochs, the first 1/9 a linear warm-up (default 90 "
        "with 10 warm-up, as main_linprobe.py and run_mae_eval_linear.py)",
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="--linear-protocol mae: samples per SGD step, lr = 0.1 x batch / 256; with --train-images "
        "also images per forward pass (default 512, the official per-GPU --batch_size)",
    )
    parser.add_argument(
        "--device",
        default=None,
        help="--train-images: auto (CUDA if available, else CPU), cpu, cuda or cuda:N (default: auto)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        help="--train-images: DataLoader worker processes reading images (default: the CPUs this "
        "process may use, at most 8; 0 reads in the main process)",
    )
    parser.add_argument("--k", type=int, default=20, help="neighbours in the kNN vote (default 20)")
    parser.add_argument(
        "--temperature",
        type=float,
        default=0.07,
        help="kNN vote temperature T: weight exp(cosine/T) (default 0.07, as DINO)",
    )


def run(args: argparse.Namespace) -> int:
    from histodistill.eval.probe import evaluate_probes, load_patch_features

    mae_options = _mae_options(args)
    if args.train_images:
        data, test, linear, record = _image_inputs(args)
    else:
        _check_feature_arguments(args)
        data = load_patch_features(args.features or args.train, args.labels)
        test = load_patch_features(args.test) if args.test else None
        linear, record = None, None
    print(_classes_line(data, args.labels or args.features or args.train or args.train_images))
    results = evaluate_probes(
        data,
        args.out,
        test=test,
        seeds=tuple(args.seeds),
        folds=args.folds,
        C=args.C,
        k=args.k,
        temperature=args.temperature,
        linear_protocol=args.linear_protocol,
        mae_options=mae_options,
        linear=linear,
        record=record,
    )
    for name in ("linear", "knn"):
        mean, std = results[name]["mean"], results[name]["std"]
        print(f"{name:6s} " + "  ".join(f"{m} {mean[m]:.3f}±{std[m]:.3f}" for m in sorted(mean)))
    return 0


def _classes_line(data, source: str) -> str:
    """Each class and its count, said before the probes train
    (`histodistill.data.labels.describe_classes`)."""
    from histodistill.data.labels import describe_classes

    unit = "slides" if data.groups is not None else "images"
    return describe_classes([data.classes[i] for i in data.labels], unit, str(source))


def _mae_options(args: argparse.Namespace) -> dict:
    """``epochs`` and ``batch_size`` of the mae protocol (the official defaults when not given)."""
    from histodistill.errors import UserError
    from histodistill.eval.probe import BATCH_SIZE, EPOCHS, WARMUP_EPOCHS

    given = [
        f"--{name.replace('_', '-')}" for name in ("epochs", "batch_size") if getattr(args, name) is not None
    ]
    if args.linear_protocol != "mae":
        if given:
            raise UserError(
                f"{' and '.join(given)} set the MAE linear probe's training: add --linear-protocol mae"
            )
        return {}
    options = {
        "epochs": EPOCHS if args.epochs is None else args.epochs,
        "batch_size": BATCH_SIZE if args.batch_size is None else args.batch_size,
    }
    if options["epochs"] < 1 or options["batch_size"] < 1:
        raise UserError("--epochs and --batch-size must be >= 1")
    # The official 10 of 90 epochs warm up; a shortened run keeps that share (--epochs 9: 1 warm-up epoch).
    options["warmup_epochs"] = round(options["epochs"] * WARMUP_EPOCHS / EPOCHS)
    return options


def _check_feature_arguments(args: argparse.Namespace) -> None:
    from histodistill.errors import UserError

    image_only = [
        flag
        for flag, given in (
            ("--test-images", args.test_images),
            ("--model", args.model),
            ("--weights", args.weights),
            ("--random-init", args.random_init),
            ("--device", args.device),
            ("--workers", args.workers is not None),
        )
        if given
    ]
    if image_only:
        raise UserError(
            f"{', '.join(image_only)} go(es) with --train-images (an image folder, run through a model); "
            "--features/--train read features that `histodistill extract` made: drop it"
        )
    if args.train and not args.test:
        raise UserError("--train needs --test (or use --features for cross-validation)")
    if args.test and not args.train:
        raise UserError("--test needs --train")
    if args.labels and args.train:
        raise UserError("--labels works with --features only; relabel the train and test files separately")


def _image_inputs(args: argparse.Namespace):
    """The eval-transform features of both folders, the augmented-image linear probe and what probe.json
    records; every input is checked (folders, then the model) before any image goes through the model."""
    from histodistill.commands.extract import default_workers
    from histodistill.distributed import resolve_device
    from histodistill.errors import UserError
    from histodistill.eval.image_probe import (
        ImageProbeData,
        eval_features,
        image_linear_probe,
        open_image_folders,
    )
    from histodistill.eval.probe import BATCH_SIZE
    from histodistill.models.backbones import seeded_backbone

    if not args.test_images:
        raise UserError("--train-images needs --test-images (a second image folder with the same classes)")
    if args.test or args.labels:
        raise UserError(
            "--test and --labels go with --train/--features; with --train-images pass --test-images"
        )
    if args.linear_protocol != "mae":
        raise UserError(
            "--train-images runs the MAE linear probe on augmented images: add --linear-protocol mae "
            "(for the sklearn probe, `histodistill extract --images` each folder and pass --train/--test)"
        )
    if not args.model:
        raise UserError(
            "--train-images needs --model: the frozen backbone (a name, a .ckpt or an export folder)"
        )
    check_model_arguments(args)
    workers = default_workers() if args.workers is None else args.workers
    if workers < 0:
        raise UserError("--workers must be >= 0")
    train, test = open_image_folders(args.train_images, args.test_images)
    device = resolve_device(args.device or "auto")
    backbone = seeded_backbone(args.model, args.weights, pretrained=not args.random_init)
    data = ImageProbeData(backbone, train, test, device, workers)
    train_features, test_features = eval_features(data, args.batch_size or BATCH_SIZE)
    record = {
        "images": {
            "train": str(args.train_images),
            "test": str(args.test_images),
            "model": str(args.model),
            "weights_source": backbone.spec.source,
            "train_transform": "linprobe",
            "test_transform": "eval",
        }
    }
    return train_features, test_features, image_linear_probe(data), record
