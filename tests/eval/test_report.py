"""The HTML report: self-contained, every section present, and rendered by a real browser."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
from PIL import Image

from histodistill.cli import main
from histodistill.errors import UserError
from histodistill.eval.report import build_report


def _png(path, width=64, height=48, seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


@pytest.fixture
def chain(tmp_path):
    """A demo-like chain: timings, a fit run (config, metrics, curves, figure), a tiling QC image."""
    root = tmp_path / "demo"
    fit = root / "sdmae"
    fit.mkdir(parents=True)
    (fit / "config.yaml").write_text("model:\n  class_path: histodistill.methods.sdmae.SDMAE\n")
    (fit / "metrics.json").write_text(json.dumps({"final": {"train/loss": 0.25, "val/accuracy": 0.8}}))
    rows = ["epoch,step,train/loss,val/accuracy"] + [f"0,{s},{1.0 / (s + 1):.4f}," for s in range(5)]
    (fit / "metrics.csv").write_text("\n".join(rows) + "\n")
    _png(fit / "figures" / "reconstruction.png")
    _png(root / "tiles" / "qc" / "slide.png", width=2400, height=1800, seed=1)  # shrunk for the page
    _png(root / "data" / "nuclei" / "train" / "a" / "0.png")  # a data image, not a figure
    for name, seconds in (("sdmae", 12.5), ("tiles", 3.0), ("data", 1.0)):
        (root / name / "stage.json").write_text(json.dumps({"summary": {"n": 1}, "seconds": seconds}))
    (root / "timings.json").write_text(json.dumps({"data": 1.0, "tiles": 3.0, "sdmae": 12.5}))
    return root


def test_report_has_every_section_and_no_external_assets(chain):
    page = build_report(chain).read_text()
    for anchor in ("s-stages", "s-tiles", "s-sdmae"):
        assert f'id="{anchor}"' in page
    assert "16.5 s" in page  # total of the stage timings
    assert "val/accuracy" in page and "0.8" in page
    assert "Training curves" in page
    sources = re.findall(r'<img src="([^"]+)"', page)
    assert len(sources) == 3  # curves, reconstruction, QC: the data image is not a figure
    assert "nuclei" not in page
    assert all(src.startswith("data:image/") for src in sources)
    assert not re.search(r'(src|href)="https?:', page)
    assert "<script" not in page


def test_wide_figures_are_shrunk_for_the_screen(chain):
    from histodistill.eval import report

    shrunk = report._screen_sized(chain / "tiles" / "qc" / "slide.png")
    import io

    assert Image.open(io.BytesIO(shrunk)).width == report.MAX_FIGURE_PX


def test_single_run_directory_and_cli(chain, tmp_path, capsys):
    out = tmp_path / "r.html"
    assert main(["report", str(chain / "sdmae"), "--out", str(out)]) == 0
    assert out.is_file() and "wrote" in capsys.readouterr().out
    assert 'id="s-stages"' not in out.read_text()


def test_empty_directory_is_refused_clearly(tmp_path, capsys):
    with pytest.raises(UserError, match="nothing to report"):
        build_report(tmp_path)
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert "is not a directory" in capsys.readouterr().err


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if path := shutil.which(name):
            return path
    return None


@pytest.mark.browser
def test_report_renders_in_headless_chromium(chain, tmp_path):
    playwright = pytest.importorskip(
        "playwright.sync_api", reason="playwright is installed with the dev extra"
    )
    executable = _chromium()
    if executable is None:
        pytest.skip("no Chromium on this machine: install Debian's `chromium` package (CI does)")
    page_path = build_report(chain)
    errors: list[str] = []
    flags = [
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
    ]
    with playwright.sync_playwright() as driver:
        browser = driver.chromium.launch(executable_path=executable, args=flags)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.on(
                "console", lambda message: errors.append(message.text) if message.type == "error" else None
            )
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.goto(page_path.as_uri())
            page.wait_for_load_state("load")
            assert page.locator("section").count() == 3
            assert page.locator("table").count() >= 2
            # Lazy images below the fold load once scrolled to; then every image must have decoded.
            page.evaluate("window.scrollTo(0, document.body.scrollHeight)")
            page.wait_for_function("Array.from(document.images).every(i => i.complete)")
            decoded = page.evaluate("Array.from(document.images).map(i => i.naturalWidth > 0)")
            assert decoded and all(decoded)
            page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
        finally:
            browser.close()
    assert errors == []
    assert (tmp_path / "report.png").stat().st_size > 10_000


def test_a_demo_report_opens_on_the_extractor_table_and_shows_folds_as_a_table(chain):
    rows = [
        {
            "name": "moma_student",
            "probe_balanced_accuracy": 0.8123,
            "slide_auroc": 0.9012,
            "slide_auroc_ci": [0.8011, 0.9655],
            "balanced_accuracy": 0.85,
            "localisation_auroc": 0.777,
            "tiles_per_s": 512.3,
            "parameters": 11176512,
        },
        {
            "name": "colour_only",
            "probe_balanced_accuracy": None,
            "slide_auroc": 0.5,
            "slide_auroc_ci": [0.35, 0.65],
            "balanced_accuracy": 0.5,
            "localisation_auroc": None,
            "tiles_per_s": 900.0,
            "parameters": 0,
        },
    ]
    (chain / "summary.json").write_text(json.dumps({"extractors": rows, "note": "60 slides"}))
    mil = chain / "mil"
    mil.mkdir()
    folds = [
        {"auroc": 0.8333333333333334, "balanced_accuracy": 0.75, "n_test": 12},
        {"auroc": 0.9166666666666666, "balanced_accuracy": 0.8, "n_test": 12},
    ]
    (mil / "metrics.json").write_text(
        json.dumps(
            {
                "model": "abmil",
                "classes": ["negative", "positive"],
                "dropped_empty": [],
                "folds": folds,
                "mean": {"auroc": 0.875},
            }
        )
    )
    (chain / "timings.json").write_text(json.dumps({"data": 1.0, "tiles": 3.0, "sdmae": 12.5, "mil": 2.0}))
    page = build_report(chain).read_text()
    assert page.index('id="s-summary"') < page.index('id="s-stages"')
    assert "0.901 [0.801, 0.966]" in page and "11,176,512" in page and "–" in page
    # folds: a table, not a Python repr
    assert "0.8333333333333334" not in page and "{&#x27;auroc" not in page
    assert "<th>auroc</th>" in page and "0.8333" in page
    assert "negative, positive" in page and "[&#x27;negative" not in page  # lists read as text, not a repr
