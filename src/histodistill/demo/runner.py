"""The demo's context for the shared stage runner (`histodistill.pipelines.runner`): each finished stage
leaves ``<out>/<stage>/stage.json`` recording the demo's kind (``quick``) and sizes, and is skipped next time,
so an interrupted demo resumes where it stopped; a folder finished with other sizes is refused."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class DemoContext:
    out: Path
    quick: bool  # the smoke run: every stage on a slice of the data
    device: str  # "cpu" or "cuda"
    overwrite: bool
    # Every size the results depend on (slides, epochs, ...: `histodistill.demo.stages.SIZES`), recorded
    # with each finished stage.
    sizes: Mapping[str, float] = field(default_factory=dict)

    @property
    def settings(self) -> dict:
        """What each stage records and a resumed run must match: the demo's kind and its sizes."""
        return {"quick": self.quick, **self.sizes}

    def stage_dir(self, name: str) -> Path:
        path = self.out / name
        path.mkdir(parents=True, exist_ok=True)
        return path
