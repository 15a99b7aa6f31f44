"""The ``tm-tensorboard`` command: ``tm-tensorboard demo`` trains the demo runs and opens TensorBoard."""
from __future__ import annotations

import argparse
import sys
import threading
from typing import Sequence


def _demo(args: argparse.Namespace) -> int:
    from .demo import serve, write_demo_logs

    steps, every = (40, 20) if args.smoke else (args.steps, args.every)
    write_demo_logs(args.logdir, steps=steps, every=every, train_size=1000 if args.smoke else 6000)
    print(f"logs written to {args.logdir}")
    if args.no_serve:
        return 0
    url = serve(args.logdir, args.port)
    print(f"TensorBoard at {url}#tm_invariance  (the Invariance tab; Ctrl-C stops it)", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tm-tensorboard", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
