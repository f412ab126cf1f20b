"""One MIL cross-validation per features folder (one per extractor), side by side: `cross_validate_many`,
what `histodistill distill` (teacher, un-tuned and tuned student) and the demo's slide task run.

A bag of a few dozen tiles is too small to split over threads (an ABMIL step is ~5 ms on one core,
docs/mil.md), so a CPU's cores are used by running the folders' `histodistill.eval.mil_cv.cross_validate`s
in parallel spawned processes, one intra-op thread each. Every run is on one thread, in a worker or in this
process: a run is bit-identical to itself at a fixed thread count but not between 1 and 2 threads (measured
on 512-d bags of 40 tiles, 3 epochs: ABMIL's out-of-fold probabilities differ by up to 8e-4, TransMIL's by
0.06), so one thread is what makes any worker count write the same files (tested) on any machine.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from histodistill.eval.mil_config import CVConfig

if TYPE_CHECKING:
    from histodistill.eval.mil_cv import CVResult

__all__ = ["cross_validate_many", "mil_workers", "one_thread"]


def mil_workers(device: str) -> int:
    """The default number of parallel cross-validations: one per usable CPU core on a CPU
    (`histodistill.distributed.usable_cpus`: affinity, Slurm and cgroup pinning honoured); one on a GPU,
    which a single run already keeps busy. ``device``: ``cpu``, ``cuda[:i]`` or ``auto``."""
    from histodistill.distributed import resolve_device, usable_cpus

    return usable_cpus() if resolve_device(device).type == "cpu" else 1


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """torch on one intra-op thread inside the block; the count before is restored after."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _cross_validate_on_one_thread(
    job: tuple, log: Callable[[str], None] | None = None
) -> tuple[CVResult, list[str]]:
    """One folder's `cross_validate` (overwriting) on one thread: (its result, the lines it logged); lines
    also go to ``log`` as they come when given (the in-process runner), else only back to the parent, which
    prints them whole."""
    from histodistill.eval.mil_cv import cross_validate

    features, labels, out, config = job
    lines: list[str] = []

    def keep(line: str) -> None:
        lines.append(line)
        if log is not None:
            log(line)

    with one_thread():
        return cross_validate(features, labels, out, config, overwrite=True, log=keep), lines


def cross_validate_many(
    features: dict[str, str | Path],
    labels: str | Path,
    out: str | Path,
    config: CVConfig,
    *,
    workers: int | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, CVResult]:
    """`cross_validate` of ``config`` on each features folder of ``features`` (``{name: folder}``) against
    the ``case_id,slide_id,label`` CSV ``labels``, into ``out/<name>`` (overwriting: a run there is done
    again whole); returns ``{name: CVResult}`` in the order of ``features``. The same labels and
    ``config.train.seed`` give every name the same folds.

    ``workers``: parallel spawned processes (default `mil_workers` of ``config.train.device``; never more
    than the names); 1 runs them one after another in this process. The files are the same for any count.
    ``log`` gets ``MIL on <name>:`` and then that run's lines, indented, whole: as they come in this
    process, when the run ends with workers. Workers are spawned: a script that calls this with more than
    one needs the ``if __name__ == "__main__":`` guard, as any multiprocessing program.

    Raises what `cross_validate` raises (`UserError` for bad features or labels), for the first run that
    fails; runs not yet started are cancelled.
    """
    from concurrent.futures import ProcessPoolExecutor, as_completed
    from multiprocessing import get_context

    out = Path(out)
    jobs = {name: (folder, labels, out / name, config) for name, folder in features.items()}
    workers = min(workers or mil_workers(config.train.device), len(jobs))
    results = {}
    if workers <= 1:
        for name, job in jobs.items():
            log(f"MIL on {name}:")
            results[name], _ = _cross_validate_on_one_thread(job, lambda line: log(_indented(line)))
        return results
    # spawn, not fork: a forked child would inherit the parent's torch thread pools mid-state.
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
        running = {pool.submit(_cross_validate_on_one_thread, job): name for name, job in jobs.items()}
        try:
            for done in as_completed(running):
                result, lines = done.result()
                for line in [f"MIL on {running[done]}:", *map(_indented, lines)]:
                    log(line)
                results[running[done]] = result
        except BaseException:
            pool.shutdown(cancel_futures=True)
            raise
    return {name: results[name] for name in jobs}


def _indented(line: str) -> str:
    return "  " + line.replace("\n", "\n  ")
