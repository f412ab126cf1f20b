"""A self-contained static HTML page for a run directory or a whole demo chain.

One file, no external assets: figures are embedded as PNG data URIs and styles are inline, so the
page can be mailed, archived or opened from a laptop without the run directory. No JavaScript.

What goes in, found by walking the directory (so it follows whatever a stage wrote):
- ``summary.json`` with ``extractors`` (a demo chain): its ``verdict`` sentence, then the opening table, one
  row per extractor (its ``label``): slide AUROC [95 % CI], tile-probe AUROC, tiles/s, parameters, then
  patch-probe balanced accuracy, slide balanced accuracy, localisation AUROC;
- ``summary.json`` of `histodistill distill` (``teacher``, ``student_untuned``, ``student``, ``retention``):
  the opening verdict, the three models side by side, a plot of their AUROCs with CIs, retention,
  speed-up and the projection (`_distill_section`);
- ``timings.json`` (a demo chain): the stages with their wall time and summaries;
- every ``metrics.json``: a table of its numbers;
- every ``metrics.csv`` (Lightning's CSVLogger): training curves drawn here;
- every PNG in a ``figures/``, ``qc/`` or ``heatmaps/`` folder (reconstruction grids, confusion
  matrices, ROC curves, tiling QC, heatmaps, montages), grouped by folder, at most ``max_images`` per
  folder; other PNGs (patch datasets) are data, not figures, and stay out;
- every ``config.yaml``: the resolved config, folded.
"""

from __future__ import annotations

import base64
import csv
import datetime as dt
import html
import io
import json
import math
from pathlib import Path

from histodistill.errors import UserError
from histodistill.io import atomic_path

FIGURE_FOLDERS = {"figures", "qc", "heatmaps"}  # where stages write their PNGs
MAX_FIGURE_PX = 1100  # wider figures are shrunk: the page column is 1200 px
MAX_FIGURE_BYTES = 400_000  # heavier ones are re-encoded as JPEG
SUMMARY_JSON = "summary.json"  # a demo's per-extractor results, the report's opening table
# the rows of `histodistill distill`'s summary.json
DISTILL_MODELS = (
    "teacher",
    "student_untuned",
    "student",
)
# (key in summary.json, column header, format); a missing or null value shows as "–".
# The first four are the distill table's columns (docs/benchmarks/distill.md).
EXTRACTOR_COLUMNS = (
    ("slide_auroc", "slide AUROC [95 % CI]", "{:.3f}"),
    ("tile_probe_auroc", "tile probe AUROC", "{:.3f}"),
    ("tiles_per_s", "tiles/s", "{:.0f}"),
    ("parameters", "parameters", "{:,}"),
    ("probe_balanced_accuracy", "patch probe bal. acc.", "{:.3f}"),
    ("balanced_accuracy", "slide bal. acc.", "{:.3f}"),
    ("localisation_auroc", "localisation AUROC", "{:.3f}"),
)

STYLE = """
body{font:15px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;\
margin:0;color:#1d1d24;background:#fafafa}
header{background:#3b2a5a;color:#fff;padding:18px 28px}header h1{margin:0 0 4px;font-size:22px}
header p{margin:0;opacity:.85}nav{padding:8px 28px;background:#ece8f3;position:sticky;top:0}
nav a{margin-right:14px;color:#3b2a5a;text-decoration:none;font-weight:600}
main{max-width:1200px;margin:0 auto;padding:8px 28px 40px}
section{background:#fff;border:1px solid #e2e0e8;border-radius:8px;padding:14px 20px;margin:18px 0}
h2{margin:4px 0 10px;font-size:19px;color:#3b2a5a}h3{font-size:15px;margin:14px 0 6px;color:#555}
table{border-collapse:collapse;margin:6px 0 10px;font-size:14px}
th,td{border-bottom:1px solid #e6e6ee;padding:4px 12px 4px 0;text-align:left;vertical-align:top}
td.num{text-align:right;font-variant-numeric:tabular-nums}
.gallery{display:flex;flex-wrap:wrap;gap:12px}figure{margin:0;max-width:560px}
figure img{max-width:100%;height:auto;border:1px solid #ddd;border-radius:4px;background:#fff}
figcaption{font-size:12px;color:#666;word-break:break-all}
pre{background:#f4f3f7;padding:10px;overflow:auto;font-size:12px;max-height:420px}
details summary{cursor:pointer;color:#3b2a5a}
"""


def build_report(run_dir: str | Path, out: str | Path | None = None, max_images: int = 12) -> Path:
    """Write the report of ``run_dir`` to ``out`` (default ``<run_dir>/report.html``); return its path."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"{run_dir} is not a directory: give a run directory (of fit, mil, tile or demo)")
    out = Path(out) if out else run_dir / "report.html"
    timings = _read_json(run_dir / "timings.json")
    if timings:  # a chain: its summary table, then one section per stage, in the order they ran
        summary = _read_json(run_dir / SUMMARY_JSON)
        distilled = isinstance(summary, dict) and DISTILL_MODELS[0] in summary
        first = _distill_section(summary) if distilled else _extractor_section(summary)
        parts = [first, _timings_section(run_dir, timings)]
        parts += [
            _directory_section(run_dir / name, name, max_images)
            for name in timings
            if (run_dir / name).is_dir()
        ]
        title = f"histodistill {'distill' if distilled else 'demo'} — {run_dir.resolve().name}"
    else:
        parts = [_directory_section(run_dir, run_dir.resolve().name, max_images)]
        title = f"histodistill run — {run_dir.resolve().name}"
    sections = [part for part in parts if part]
    if not sections:
        raise UserError(
            f"{run_dir} holds nothing to report (no metrics, figures or config): is it a run directory?"
        )
    nav = "".join(f'<a href="#{_anchor(name)}">{html.escape(name)}</a>' for name, _ in sections)
    main = "".join(body for _, body in sections)
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    page = (
        f'<!doctype html><html lang="en"><head><meta charset="utf-8">'
        f'<meta name="viewport" content="width=device-width,initial-scale=1">'
        f"<title>{html.escape(title)}</title><style>{STYLE}</style></head><body>"
        f"<header><h1>{html.escape(title)}</h1><p>{html.escape(str(run_dir.resolve()))} · generated "
        f"{stamp}</p></header><nav>{nav}</nav><main>{main}</main></body></html>\n"
    )
    with atomic_path(out) as tmp:
        tmp.write_text(page, encoding="utf-8")
    return out


def _anchor(name: str) -> str:
    return "s-" + "".join(ch if ch.isalnum() else "-" for ch in name)


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _timings_section(run_dir: Path, timings: dict) -> tuple[str, str]:
    rows = []
    for name, seconds in timings.items():
        record = _read_json(run_dir / name / "stage.json") or {}
        summary = ", ".join(f"{k}={v}" for k, v in (record.get("summary") or {}).items())
        rows.append(
            f'<tr><td><a href="#{_anchor(name)}">{html.escape(name)}</a></td>'
            f'<td class="num">{seconds:.1f} s</td><td>{html.escape(summary)}</td></tr>'
        )
    total = sum(timings.values())
    rows.append(f'<tr><th>total</th><td class="num"><b>{total:.1f} s</b></td><td></td></tr>')
    body = (
        '<section id="s-stages"><h2>Stages and timing</h2><table><tr><th>stage</th><th>time</th>'
        f"<th>summary</th></tr>{''.join(rows)}</table></section>"
    )
    return "stages", body


def _extractor_section(summary: dict | None) -> tuple[str, str] | None:
    """The table that answers "which extractor should I use": one row per extractor."""
    if not summary or not summary.get("extractors"):
        return None
    head = "".join(f"<th>{html.escape(title)}</th>" for _, title, _ in EXTRACTOR_COLUMNS)
    rows = []
    for row in summary["extractors"]:
        cells = []
        for key, _, spec in EXTRACTOR_COLUMNS:
            value = row.get(key)
            text = "–" if value is None else spec.format(value)
            if key == "slide_auroc" and row.get("slide_auroc_ci"):
                text += " [{:.3f}, {:.3f}]".format(*row["slide_auroc_ci"])
            cells.append(f'<td class="num">{html.escape(text)}</td>')
        rows.append(f"<tr><td>{html.escape(row.get('label', row['name']))}</td>{''.join(cells)}</tr>")
    verdict = f"<p><b>{html.escape(summary['verdict'])}</b></p>" if summary.get("verdict") else ""
    note = f"<p>{html.escape(summary['note'])}</p>" if summary.get("note") else ""
    body = (
        '<section id="s-summary"><h2>Which extractor?</h2>'
        f"{verdict}{note}<table><tr><th>extractor</th>{head}</tr>"
        f"{''.join(rows)}</table></section>"
    )
    return "summary", body


def _distill_section(summary: dict) -> tuple[str, str]:
    """`histodistill distill`'s answer: the verdict, the teacher and both students side by side, their slide
    AUROCs with CIs as a plot, retention, speed-up and the projection on this machine."""
    unit = summary["projection"]["unit"]
    head = "".join(
        f"<th>{html.escape(title)}</th>"
        for title in (
            "model",
            "slide AUROC [95 % CI]",
            "slide bal. acc.",
            "tiles/s (extraction)",
            "tiles/s (forward)",
            "parameters",
            f"{unit} for 10k slides",
        )
    )
    rows = []
    for key in DISTILL_MODELS:
        row = summary[key]
        auroc = (
            "–"
            if row["slide_auroc"] is None
            else "{:.3f} [{:.3f}, {:.3f}]".format(row["slide_auroc"], *row["slide_auroc_ci"])
        )
        cells = [
            auroc,
            *(
                "–" if row.get(k) is None else spec.format(row[k])
                for k, spec in (
                    ("balanced_accuracy", "{:.3f}"),
                    ("tiles_per_s", "{:,.0f}"),
                    ("forward_tiles_per_s", "{:,.0f}"),
                    ("parameters", "{:,}"),
                    ("projected_hours", "{:,.1f}"),
                )
            ),
        ]
        rows.append(
            f"<tr><td>{html.escape(row['name'])}</td>"
            + "".join(f'<td class="num">{html.escape(c)}</td>' for c in cells)
            + "</tr>"
        )
    retention, fit, machine = summary["retention"], summary["fit"], summary["machine"]
    facts = [f"Speed-up of the student ({summary['speed_measure']}): {summary['speedup']}x."]
    if retention["value"] is not None:
        low, high = ("unbounded" if v is None else f"{v:.1%}" for v in retention["ci"])
        facts.insert(
            0,
            "Retention (student / teacher slide AUROC, paired bootstrap over the same slides): "
            f"{retention['value']:.1%} [95 % CI {low}, {high}].",
        )
    else:
        agreement = summary.get("agreement", {})
        facts.insert(
            0,
            f"No slide labels: the AUROC comparison needs a labels CSV. Feature agreement on "
            f"{agreement.get('tiles')} tiles ({agreement.get('slides')} slides): cosine "
            f"{agreement.get('student_cosine')}, linear CKA {summary['student'].get('feature_cka')}.",
        )
    facts.append(
        f"Projection: 10,000 slides of 10,000 tiles in {unit} at the rates measured on this machine "
        f"({machine['gpu'] or machine['cpu']}, {machine['cores']} CPU cores, device {machine['device']})."
    )
    unlabeled = (
        "fine-tunes on the target cohort's slides, unlabeled, as the paper does"
        if fit.get("unlabeled")
        else "trains on the labelled patches given"
    )
    facts.append(
        f"The fit ({fit['method']}) {unlabeled}: {fit['slides_fit']} slides in the fit, "
        f"{fit['slides_held_out']} held out, {fit['steps']} optimiser steps; the student started from "
        f"{fit['student_start']} weights."
    )
    plot = _auroc_figure(summary)
    figure = f'<div class="gallery">{_figure(plot, "slide AUROC with 95 % CI")}</div>' if plot else ""
    body = (
        f'<section id="s-summary"><h2>Distilled: does the student keep the teacher\'s slide AUROC?</h2>'
        f"<p><b>{html.escape(summary['verdict'])}</b></p><table><tr>{head}</tr>{''.join(rows)}</table>{figure}"
        + "".join(f"<p>{html.escape(fact)}</p>" for fact in facts)
        + "</section>"
    )
    return "summary", body


def _auroc_figure(summary: dict) -> bytes | None:
    """The three models' slide AUROCs with their 95 % CIs as error bars (PNG), or None without labels."""
    rows = [summary[key] for key in DISTILL_MODELS]
    if any(row["slide_auroc"] is None for row in rows):
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    values = [row["slide_auroc"] for row in rows]
    errors = [
        [v - row["slide_auroc_ci"][0] for v, row in zip(values, rows, strict=True)],
        [row["slide_auroc_ci"][1] - v for v, row in zip(values, rows, strict=True)],
    ]
    fig, ax = plt.subplots(figsize=(5.5, 3.2), dpi=110)
    ax.errorbar(range(len(rows)), values, yerr=errors, fmt="o", capsize=6, color="#3b2a5a")
    ax.set_xticks(range(len(rows)), ["teacher", "student (un-tuned)", "student (tuned)"])
    ax.set_ylabel("slide AUROC [95 % CI]")
    ax.set_ylim(min(0.4, min(row["slide_auroc_ci"][0] for row in rows) - 0.05), 1.0)
    ax.axhline(0.5, color="#999", lw=0.8, ls="--")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()


def _directory_section(directory: Path, name: str, max_images: int) -> tuple[str, str] | None:
    blocks = []
    for path in sorted(directory.rglob("metrics.json")):
        blocks.append(_metrics_table(path, directory))
    for path in sorted(directory.rglob("metrics.csv")):
        curves = _curves_figure(path)
        if curves:
            blocks.append(
                f"<h3>Training curves ({html.escape(str(path.parent.relative_to(directory)) or '.')})</h3>"
                f'<div class="gallery">{_figure(curves, "training curves")}</div>'
            )
    blocks += _galleries(directory, max_images)
    for path in sorted(directory.rglob("config.yaml")):
        text = path.read_text(errors="replace")
        blocks.append(
            f"<details><summary>config: {html.escape(str(path.relative_to(directory)))}</summary>"
            f"<pre>{html.escape(text)}</pre></details>"
        )
    if not blocks:
        return None
    return name, f'<section id="{_anchor(name)}"><h2>{html.escape(name)}</h2>{"".join(blocks)}</section>'


def _is_records(value) -> bool:
    """A list of dicts with the same keys (per-fold results): shown as a table, not a Python repr."""
    return isinstance(value, list) and bool(value) and all(isinstance(v, dict) for v in value)


def _flatten(prefix: str, value, rows: list[tuple[str, object]]) -> None:
    if isinstance(value, dict):
        for key, inner in value.items():
            _flatten(f"{prefix}.{key}" if prefix else str(key), inner, rows)
    else:
        rows.append((prefix, value))


def _format(value) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    if isinstance(value, list) and len(value) > 12:
        return f"[{len(value)} values]"
    if isinstance(value, list):  # class names, a CI: "negative, positive", not a Python repr
        return ", ".join(_format(item) for item in value) if value else "none"
    return str(value)


def _metrics_table(path: Path, root: Path) -> str:
    rows: list[tuple[str, object]] = []
    _flatten("", _read_json(path) or {}, rows)
    records = [(key, value) for key, value in rows if _is_records(value)]
    cells = "".join(
        f'<tr><td>{html.escape(key)}</td><td class="num">{html.escape(_format(value))}</td></tr>'
        for key, value in rows
        if not _is_records(value)
    )
    tables = "".join(_records_table(key, value) for key, value in records)
    return f"<h3>Metrics ({html.escape(str(path.relative_to(root)))})</h3><table>{cells}</table>{tables}"


def _records_table(name: str, records: list[dict]) -> str:
    """One row per record (e.g. per fold), one column per key, numbers formatted."""
    keys = list(dict.fromkeys(key for record in records for key in record))
    head = "".join(f"<th>{html.escape(key)}</th>" for key in keys)
    body = "".join(
        "<tr>"
        + "".join(f'<td class="num">{html.escape(_format(r.get(key, "")))}</td>' for key in keys)
        + "</tr>"
        for r in records
    )
    return f"<p><b>{html.escape(name)}</b></p><table><tr>{head}</tr>{body}</table>"


def _curves_figure(path: Path) -> bytes | None:
    """Each numeric column of a Lightning metrics.csv against ``step``, one small panel per metric."""
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    series: dict[str, tuple[list[float], list[float]]] = {}
    for row in rows:
        step = _number(row.get("step"))
        if step is None:
            continue
        for key, raw in row.items():
            value = _number(raw)
            if key in ("step", "epoch") or value is None:
                continue
            xs, ys = series.setdefault(key, ([], []))
            xs.append(step)
            ys.append(value)
    series = {key: xy for key, xy in series.items() if len(xy[0]) >= 2}
    if not series:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = sorted(series)[:12]
    cols = min(3, len(names))
    rows_n = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(4.2 * cols, 2.6 * rows_n), squeeze=False)
    for ax, key in zip(axes.flat, names, strict=False):
        xs, ys = series[key]
        ax.plot(xs, ys, lw=1.2, marker="o" if len(xs) < 30 else None, ms=3)
        ax.set_title(key, fontsize=9)
        ax.tick_params(labelsize=7)
        ax.set_xlabel("step", fontsize=8)
    for ax in list(axes.flat)[len(names) :]:
        ax.axis("off")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    plt.close(fig)
    return buffer.getvalue()


def _number(raw) -> float | None:
    try:
        value = float(raw)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _is_figure(path: Path, root: Path) -> bool:
    """A PNG a stage drew (in a figures/, qc/ or heatmaps/ folder), not a data image such as a patch
    dataset's crops; names starting with "." are temporary files of writers still running."""
    # Relative to the parent, so a section that is itself a heatmaps/ folder counts.
    folders = path.relative_to(root.parent).parts[:-1]
    return not path.name.startswith(".") and any(part in FIGURE_FOLDERS for part in folders)


def _galleries(directory: Path, max_images: int) -> list[str]:
    groups: dict[Path, list[Path]] = {}
    for path in sorted(directory.rglob("*.png")):
        if _is_figure(path, directory):
            groups.setdefault(path.parent, []).append(path)
    blocks = []
    for folder, paths in groups.items():
        shown = paths[:max_images]
        more = f" — {len(paths) - len(shown)} more not shown" if len(paths) > len(shown) else ""
        figures = "".join(_figure(_screen_sized(p), str(p.relative_to(directory))) for p in shown)
        label = str(folder.relative_to(directory)) if folder != directory else "."
        blocks.append(
            f'<h3>Figures ({html.escape(label)}){html.escape(more)}</h3><div class="gallery">{figures}</div>'
        )
    return blocks


def _screen_sized(path: Path) -> bytes:
    """The PNG's bytes, or a smaller re-encoding when it is wider than a report column or heavy
    (tissue QC images and heatmaps are photographs: JPEG keeps the page light)."""
    from PIL import Image

    data = path.read_bytes()
    with Image.open(io.BytesIO(data)) as image:
        if image.width <= MAX_FIGURE_PX and len(data) <= MAX_FIGURE_BYTES:
            return data
        image = image.convert("RGB")
        image.thumbnail((MAX_FIGURE_PX, MAX_FIGURE_PX * 4))
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=85)
        return buffer.getvalue()


def _figure(image: bytes, caption: str) -> str:
    mime = "image/png" if image[:4] == b"\x89PNG" else "image/jpeg"
    data = base64.b64encode(image).decode("ascii")
    return (
        f'<figure><img src="data:{mime};base64,{data}" alt="{html.escape(caption)}" loading="lazy">'
        f"<figcaption>{html.escape(caption)}</figcaption></figure>"
    )
