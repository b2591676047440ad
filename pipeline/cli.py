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


def _settings_from_args(args):
    import json

    from pipeline.settings import PipelineSettings

    values = {"run_dir": args.run_dir, "preset": args.preset, "data_kind": args.data,
              "seq_len": args.seq_len, "train_examples": args.train_examples,
              "eval_examples": args.eval_examples, "train_steps": args.steps,
              "batch_size": args.batch_size, "learning_rate": args.learning_rate,
              "precision": args.precision, "enable_cache": not args.no_cache,
              "examples_dir": args.examples_dir, "pipeline_root": args.pipeline_root,
              "metadata_path": args.metadata_path, "serving_dir": args.serving_dir}
    if args.data_params is not None:
        values["data_params"] = json.loads(args.data_params)
    elif args.data != "markov":
        values["data_params"] = {}
    if args.model_overrides:
        values["model_overrides"] = json.loads(args.model_overrides)
    if args.thresholds:
        values["thresholds"] = json.loads(args.thresholds)
    if args.beam_arg:
        values["beam_pipeline_args"] = list(args.beam_arg)
    return PipelineSettings(**values)


def _cmd_run(args) -> int:
    from pipeline.settings import SettingsError

    try:
        settings = _settings_from_args(args)
    except (SettingsError, ValueError) as e:
        print(f"deepseek-tfx run: invalid settings: {e}", file=sys.stderr)
        return 2
    from pipeline.local_runner import run_local

    print(f"deepseek-tfx: running the pipeline in {os.path.abspath(settings.run_dir)}")
    run_local(settings)
    from pipeline.inspect_metadata import collect, render

    info = collect(settings.path("metadata"))
    blessing = info["blessings"][-1] if info["blessings"] else None
    if blessing and blessing["properties"].get("blessed") == 1 and info["lineage"]:
        print(f"\nModel blessed and pushed to {settings.path('serving')}")
    else:
        print("\nModel NOT pushed.")
        for failure in (blessing or {}).get("failures", []):
            print(f"  - {failure}")
    print(f"Inspect the run: deepseek-tfx inspect --run-dir {settings.run_dir}")
    return 0


def _cmd_inspect(args) -> int:
    import json

    from pipeline.inspect_metadata import collect, render, to_dot

    path = args.metadata_path or os.path.join(args.run_dir, "metadata.sqlite")
    try:
        info = collect(path)
    except FileNotFoundError as e:
        print(f"deepseek-tfx inspect: {e}", file=sys.stderr)
        return 2
    if args.dot:
        with open(args.dot, "w") as f:
            f.write(to_dot(info))
    if args.json:
        print(json.dumps(info, indent=2, default=str))
    else:
        render(info)
    return 0


def _cmd_generate(args) -> int:
    from pipeline.serving import generate_from_pushed

    serving = args.serving_dir or os.path.join(args.run_dir, "serving")
    prompts = [[int(t) for t in p.split(",") if t.strip()] for p in args.prompt]
    try:
        outputs, version = generate_from_pushed(serving, prompts, args.max_new_tokens,
                                                args.temperature, args.top_k, args.seed)
    except (FileNotFoundError, ValueError) as e:
        print(f"deepseek-tfx generate: {e}", file=sys.stderr)
        return 2
    print(f"model version {version}")
    for prompt, out in zip(prompts, outputs):
        print(f"{prompt} -> {out}")
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

    run = sub.add_parser("run", help="run the whole pipeline locally (LocalDagRunner)")
    run.add_argument("--run-dir", default="runs/default",
                     help="pipeline root, ML Metadata and pushed models go here")
    run.add_argument("--preset", default="mini")
    run.add_argument("--model-overrides", help='JSON of config fields, e.g. \'{"num_hidden_layers": 2}\'')
    run.add_argument("--data", default="markov", help="uniform | zipf | markov | copy | mixture")
    run.add_argument("--data-params", help='JSON generator parameters, e.g. \'{"order": 2}\'')
    run.add_argument("--seq-len", type=int, default=64)
    run.add_argument("--train-examples", type=int, default=4096)
    run.add_argument("--eval-examples", type=int, default=512)
    run.add_argument("--examples-dir", help="use your own TFRecords (<dir>/train/*, <dir>/eval/*)")
    run.add_argument("--steps", type=int, default=300)
    run.add_argument("--batch-size", type=int, default=32)
    run.add_argument("--learning-rate", type=float, default=3e-3)
    run.add_argument("--precision", default="auto", help="auto | float32 | bf16 | float8")
    run.add_argument("--thresholds", help="JSON gate thresholds (see components/validation_checks.py)")
    run.add_argument("--beam-arg", action="append", help="a Beam pipeline argument (repeatable)")
    run.add_argument("--no-cache", action="store_true", help="re-run every component")
    run.add_argument("--pipeline-root")
    run.add_argument("--metadata-path")
    run.add_argument("--serving-dir")
    run.set_defaults(func=_cmd_run)

    inspect = sub.add_parser("inspect", help="show a run's ML Metadata record")
    inspect.add_argument("--run-dir", default="runs/default")
    inspect.add_argument("--metadata-path")
    inspect.add_argument("--json", action="store_true", help="machine-readable output")
    inspect.add_argument("--dot", help="also write the lineage graph as Graphviz to this file")
    inspect.set_defaults(func=_cmd_inspect)

    gen = sub.add_parser("generate", help="sample from the latest pushed SavedModel")
    gen.add_argument("--run-dir", default="runs/default")
    gen.add_argument("--serving-dir")
    gen.add_argument("--prompt", action="append", required=True,
                     help="comma-separated token ids (repeat for a batch)")
    gen.add_argument("--max-new-tokens", type=int, default=16)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--seed", type=int, default=0)
    gen.set_defaults(func=_cmd_generate)
    return parser


def main(argv=None) -> int:
    _backend_default()
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
