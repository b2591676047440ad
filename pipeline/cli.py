"""`deepseek-tfx`: the command-line entry point (thin: argument parsing only)."""

from __future__ import annotations

import argparse
import os
import sys


def _backend_default() -> None:
    # The pipeline and SavedModel export need TensorFlow; the model itself is
    # backend-agnostic. Keep a user's explicit choice.
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _cmd_demo(args) -> int:
    from pipeline.demo import run_demo

    run_demo(preset=args.preset, steps=args.steps, batch_size=args.batch_size,
             seq_len=args.seq_len, seed=args.seed)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="deepseek-tfx", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="train a preset briefly on Markov tokens and generate")
    demo.add_argument("--preset", default="mini")
    demo.add_argument("--steps", type=int, default=300)
    demo.add_argument("--batch-size", type=int, default=32)
    demo.add_argument("--seq-len", type=int, default=64)
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=_cmd_demo)
    return parser


def main(argv=None) -> int:
    _backend_default()
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
