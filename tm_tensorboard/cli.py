"""The tm-tensorboard command: "demo" trains the demo runs and opens TensorBoard, "measure" measures saved
checkpoints into a logdir, "export" writes a logdir's measures as CSV or JSON, "build-kernels" builds the CPU
kernels once for this machine."""
from __future__ import annotations

import argparse
import sys
import threading
from pathlib import Path
from typing import Sequence

# Errors that are the user's to fix (a bad path, a factory that does not import, a malformed argument):
# one line on stderr, exit status 2, no traceback.
USER_ERRORS = (ValueError, OSError, ImportError, LookupError)


def _demo(args: argparse.Namespace) -> int:
    from .demo import PortInUse, serve, write_demo_logs

    steps, every = (40, 20) if args.smoke else (args.steps, args.every)
    if not args.no_serve:  # first: a taken port is said before any training, and the tab fills in live
        Path(args.logdir).mkdir(parents=True, exist_ok=True)
        try:
            url = serve(args.logdir, args.port)
        except PortInUse as error:
            print(f"tm-tensorboard demo: error: {error}", file=sys.stderr)
            return 2
        print(f"TensorBoard at {url}#tm_invariance  (the Invariance tab; the runs appear as they train)", flush=True)
    write_demo_logs(args.logdir, steps=steps, every=every, train_size=1000 if args.smoke else 6000)
    print(f"logs written to {args.logdir}", flush=True)
    if args.no_serve:
        return 0
    print("TensorBoard keeps serving them; Ctrl-C stops it", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    return 0


def _measure(args: argparse.Namespace) -> int:
    from .checkpoints import measure_checkpoints_command

    return measure_checkpoints_command(args)


def _export(args: argparse.Namespace) -> int:
    from .reader import export

    return export(args.logdir, fmt=args.format, output=args.output, namespace=args.namespace, units=args.units)


def _build_kernels(args: argparse.Namespace) -> int:
    import time

    from . import block_pool, native

    if not native.enabled():
        print(f"tm-tensorboard build-kernels: {native.ENVIRONMENT_VARIABLE}=0 turns the CPU kernels off",
              file=sys.stderr)
        return 1
    start = time.perf_counter()
    block_pool.build()  # (where a memory budget is set: blocks above 32 MB kept between chunks)
    failed = [kernel for kernel in (*native.build_all(), *block_pool.kernels()) if kernel.failed is not None]
    for kernel in failed:
        print(f"tm-tensorboard build-kernels: the {kernel.name} kernel could not be built: {kernel.failed}",
              file=sys.stderr)
    if failed:
        return 1
    print(f"built the CPU kernels in {time.perf_counter() - start:.1f} s (recorded under "
          f"{native.record_directory()}): measure() runs them without compiling from now on", flush=True)
    return 0


def _add_demo(commands) -> None:
    demo = commands.add_parser(
        "demo",
        help="train three small models on a built-in dataset, log them, start TensorBoard",
        description="Train a CNN without and with rotation augmentation and a p4 group-equivariant CNN on "
        "procedurally drawn glyphs (no download), log their invariance with the Monitor, then start "
        "TensorBoard on 127.0.0.1 with the Invariance tab.",
    )
    demo.add_argument("--logdir", default="runs/demo", help="where to write the runs (default: runs/demo)")
    demo.add_argument("--steps", type=int, default=400, help="training steps per run (default: 400)")
    demo.add_argument("--every", type=int, default=50, help="measure every N steps (default: 50)")
    demo.add_argument("--port", type=int, default=6006, help="TensorBoard port (default: 6006; 0 picks a free one)")
    demo.add_argument("--no-serve", action="store_true", help="only write the logs")
    demo.add_argument("--smoke", action="store_true", help="a tiny budget, for tests (seconds, not minutes)")
    demo.set_defaults(run=_demo)


def _add_measure(commands) -> None:
    from .checkpoints import add_arguments

    measure = commands.add_parser(
        "measure",
        help="measure saved checkpoints of a model into a logdir, one step per checkpoint",
        description="Build the model with a factory, load each checkpoint into it, measure it on a probe "
        "and log the result at the checkpoint's step, as the Monitor would have during training.",
    )
    add_arguments(measure)
    measure.set_defaults(run=_measure)


def _add_export(commands) -> None:
    export = commands.add_parser(
        "export",
        help="write a logdir's measures (layer means per step, optionally every unit) as CSV or JSON",
        description="Read every run of LOGDIR with TensorBoard's own event reader, without a server, and "
        "write one row per (run, measure, layer, step) as CSV, or the nested structure as JSON.",
    )
    export.add_argument("logdir", help="a directory of runs written by tm_tensorboard")
    export.add_argument("--format", choices=("csv", "json"), default="csv", help="output format (default: csv)")
    export.add_argument("--output", "-o", default="-", help="output file (default: standard output)")
    export.add_argument("--namespace", default=None, help="the Monitor's namespace (default: invariance)")
    export.add_argument("--units", action="store_true", help="also every unit's value at every step")
    export.set_defaults(run=_export)


def _add_build_kernels(commands) -> None:
    build = commands.add_parser(
        "build-kernels",
        help="build the hand-written CPU kernels once for this machine (~10 s; then measure() runs them)",
        description="Build the CPU kernels of the measures' updates with the C++ toolchain torch.compile uses "
        "and record where they are, so that every later measure() on this machine loads them in a millisecond "
        "instead of running the eager statistics where compiling would not pay (a Monitor or compile=True "
        "builds them too).",
    )
    build.set_defaults(run=_build_kernels)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tm-tensorboard", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    _add_demo(commands)
    _add_measure(commands)
    _add_export(commands)
    _add_build_kernels(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except USER_ERRORS as error:
        print(f"tm-tensorboard {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
