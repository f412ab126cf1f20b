"""Run the whole chain on the real sample data, on a CPU (the full run: see docs/demo.md for its stage times;
--quick, the smoke run, about 3 minutes on 2 idle cores).

Stages run in order and each writes into its own folder under --out; a finished stage is skipped
when the demo is run again (so an interrupted demo resumes), unless --overwrite.
"""

from __future__ import annotations

import argparse

from histodistill.commands._arguments import output_folder

HELP = (
    "run the whole chain on the sample data, ending on the slide task (resumable; --quick for a shorter "
    "version)"
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--out",
        default="demo_out",
        type=output_folder,
        help="directory for every stage's outputs (default demo_out)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="the smoke run: every stage on a slice of the data, about 3 minutes on 2 idle cores; its table "
        "ranks noise",
    )
    parser.add_argument(
        "--device",
        default="auto",
        choices=("auto", "cpu", "cuda"),
        help="where to train and extract: auto = cuda when a GPU is visible, else cpu (default auto)",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="run every stage again, replacing earlier outputs"
    )


def run(args: argparse.Namespace) -> int:
    import time
    from pathlib import Path

    from histodistill.demo.runner import DemoContext
    from histodistill.demo.stages import MINUTES_ON_2_CPU_CORES, SIZES, STAGES
    from histodistill.errors import UserError
    from histodistill.pipelines.runner import format_timings, run_stages

    device = args.device
    if device != "cpu":
        import torch

        if device == "cuda" and not torch.cuda.is_available():
            raise UserError(
                "--device cuda was asked for but no CUDA GPU is visible; use --device cpu or auto"
            )
        device = "cuda" if torch.cuda.is_available() else "cpu"
    context = DemoContext(
        out=Path(args.out), quick=args.quick, device=device, overwrite=args.overwrite, sizes=SIZES[args.quick]
    )
    if device == "cpu":
        minutes = MINUTES_ON_2_CPU_CORES[args.quick]
        took = (
            f"took about {minutes} minutes on 2 CPU cores in our runs"
            if minutes is not None
            else "has not been timed on a CPU in its current form"
        )
        print(
            f"the {'quick' if args.quick else 'full'} demo {took} (docs/demo.md); each stage prints its "
            "time, and an interrupted demo resumes"
        )
    if args.quick:
        print(
            "--quick is a smoke run of every stage on a slice of the data: its table ranks noise; "
            "`histodistill demo` (the full run) gives the result"
        )
    start = time.perf_counter()
    records = run_stages(STAGES, context)
    print(f"\nhistodistill demo finished in {time.perf_counter() - start:.1f} s; outputs in {context.out}/")
    print(format_timings(records))
    return 0
