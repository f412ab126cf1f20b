"""Which share of the slides this process works on, under torchrun, srun or a SLURM job array.

Per-slide commands (`tile`, `extract`) scale by running the same command in many processes: each takes
a fixed share of the *sorted* slide list and writes its slides atomically, so shares never overlap, a
dead process leaves only its own unfinished slides, and a rerun (skipping finished slides) completes
them. No scheduler of ours: the rank comes from the launcher's environment,

- ``torchrun``: ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``;
- ``srun`` (one task per GPU): ``SLURM_PROCID``, ``SLURM_STEP_NUM_TASKS``, ``SLURM_LOCALID``. The step's
  task count, not ``SLURM_NTASKS``: a batch script itself sees ``SLURM_PROCID=0`` and the job's
  ``SLURM_NTASKS`` although it is one process, and must then do all the slides;

and ``--shard i/n`` (e.g. ``--shard $SLURM_ARRAY_TASK_ID/$N`` in a job array) adds a split across
independent jobs, without torch.distributed. Both combine: shard i of n, launched on W ranks, gives
rank r the slides ``sorted[i + n·r :: n·W]``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, TypeVar

from histodistill.errors import ConfigError, UserError

if TYPE_CHECKING:
    import torch

T = TypeVar("T")

SHARD_HELP = (
    "I/N: process only share I (0-based) of N of the sorted slides, e.g. `--shard "
    "$SLURM_ARRAY_TASK_ID/N` in a SLURM job array; ranks of torchrun/srun split each share further "
    "(default: all slides, split among the launcher's ranks)"
)


@dataclass(frozen=True)
class Share:
    """This process's share: items ``index, index + count, ...`` of a sorted list.

    ``local_rank`` is the process's index on its machine (None without a launcher), used to pick its GPU;
    ``launcher`` names where the rank came from, for the progress line.
    """

    index: int = 0
    count: int = 1
    local_rank: int | None = None
    launcher: str = "single process"

    def select(self, items: Sequence[T]) -> list[T]:
        """This process's items of ``items`` (already sorted the same way in every process)."""
        return list(items[self.index :: self.count])

    def describe(self, chosen: int, total: int) -> str:
        return f"{self.launcher}: share {self.index} of {self.count}, {chosen} of {total} slides"


def usable_cpus() -> int:
    """The CPUs this process may run on: its affinity, which honours taskset and Slurm/cgroup pinning
    (``os.cpu_count()`` where the platform has no affinity)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def parse_shard(text: str) -> tuple[int, int]:
    """``"i/n"`` -> (i, n) with 0 <= i < n; anything else is a `ConfigError` naming ``shard``."""
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not match or not 0 <= int(match[1]) < int(match[2]):
        raise ConfigError(
            f"`shard={text}`: expected I/N with 0 <= I < N, e.g. `shard=0/4` (the first of 4 shares)"
        )
    return int(match[1]), int(match[2])


def launcher_rank(env: Mapping[str, str] | None = None) -> tuple[int, int, int | None, str]:
    """(rank, world size, local rank or None, launcher) from torchrun's or srun's environment; (0, 1, None,
    "single process") outside both. torchrun wins when both are set (torchrun started by srun)."""
    env = os.environ if env is None else env
    for launcher, (rank, world, local) in {
        "torchrun": ("RANK", "WORLD_SIZE", "LOCAL_RANK"),
        "srun": ("SLURM_PROCID", "SLURM_STEP_NUM_TASKS", "SLURM_LOCALID"),
    }.items():
        if rank in env and world in env:
            try:
                values = int(env[rank]), int(env[world]), int(env.get(local, env[rank]))
            except ValueError:
                raise UserError(
                    f"{launcher}: {rank}={env[rank]!r} and {world}={env[world]!r} must be integers"
                ) from None
            if not 0 <= values[0] < values[1]:
                raise UserError(f"{launcher}: {rank}={values[0]} is not below {world}={values[1]}")
            return (*values, launcher)
    return 0, 1, None, "single process"


def this_process(shard: str | None = None, env: Mapping[str, str] | None = None) -> Share:
    """The share of this process: its launcher rank within ``shard`` ``"i/n"`` (see the module docstring)."""
    rank, world, local_rank, launcher = launcher_rank(env)
    shard_index, shard_count = parse_shard(shard) if shard else (0, 1)
    if shard:
        launcher = f"shard {shard_index}/{shard_count}" + (
            f", {launcher} rank {rank}/{world}" if world > 1 else ""
        )
    elif world > 1:
        launcher = f"{launcher} rank {rank}/{world}"
    return Share(shard_index + shard_count * rank, shard_count * world, local_rank, launcher)


def add_shard_argument(parser: argparse.ArgumentParser) -> None:
    """``--shard I/N``, worded the same for every per-slide command."""
    parser.add_argument("--shard", metavar="I/N", default=None, help=SHARD_HELP)


def local_device(device: str, share: Share) -> str:
    """``auto``/``cuda`` -> ``cuda:<local rank>`` when a launcher started several processes on a GPU machine
    (modulo the visible devices: srun with ``--gpus-per-task 1`` shows each task one GPU as cuda:0)."""
    import torch

    if device in ("auto", "cuda") and share.local_rank is not None and torch.cuda.is_available():
        return f"cuda:{share.local_rank % torch.cuda.device_count()}"
    return device


def resolve_device(device: str) -> torch.device:
    """``auto`` picks CUDA when present; asking for ``cuda`` without one is a user error."""
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"`device={device}`: no CUDA device is visible; use `device=cpu` or `device=auto`")
    return torch.device(device)


@contextlib.contextmanager
def process_group(timeout_minutes: float = 30) -> Iterator[bool]:
    """A CPU (gloo) process group for the duration of the block when torchrun launched us (it sets the
    rendezvous ``MASTER_ADDR``/``MASTER_PORT``), used only for barriers; yields whether one is up.

    srun and job arrays have no rendezvous, and a group already initialised (inside a Lightning DDP run)
    is used as it is and left alone.
    """
    import torch.distributed as dist

    if dist.is_initialized():
        yield True
        return
    env = os.environ
    if not (
        dist.is_available() and "MASTER_ADDR" in env and "RANK" in env and int(env.get("WORLD_SIZE", 1)) > 1
    ):
        yield False
        return
    dist.init_process_group("gloo", timeout=timedelta(minutes=timeout_minutes))
    try:
        yield True
    finally:
        dist.destroy_process_group()


def is_rank_zero() -> bool:
    """Rank 0 of an initialised process group, or True without one."""
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def barrier() -> None:
    """Wait for every rank of the process group; nothing without one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def write_json_once(path: str | os.PathLike, obj: object, share: Share, replace: bool = False) -> None:
    """Write a folder-wide record (``extractor.json``) once among the processes sharing the work; each
    caller then reads and checks it.

    One process (``share.count == 1``) simply writes it when absent. Several: with a process group, rank 0
    writes and the others wait at a barrier; without one (srun, job arrays) every process writes it only
    if absent, so the first one wins, atomically. ``replace`` writes it whatever is there (overwriting).
    """
    from histodistill.io import write_json, write_json_if_absent

    if share.count == 1 or is_rank_zero():
        (write_json if replace else write_json_if_absent)(path, obj)
    if share.count > 1:
        barrier()
