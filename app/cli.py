"""`deepseek-tfx`: the command-line entry point (argument parsing, and what
`run` reports: its verdict and exit status)."""

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
    from app.demo import run_demo

    run_demo(preset=args.preset, steps=args.steps, batch_size=args.batch_size,
             seq_len=args.seq_len, seed=args.seed)
    return 0


def _settings_from_args(args):
    import json

    from pipeline.settings import PipelineSettings

    if args.base_model and args.preset:
        raise ValueError("--preset and --base-model: the base model's config.json is the model; give one")
    values = {"run_dir": args.run_dir, "preset": args.preset or PipelineSettings.preset,
              "base_model": args.base_model, "data_kind": args.data,
              "seq_len": args.seq_len, "train_examples": args.train_examples,
              "eval_examples": args.eval_examples, "train_steps": args.steps,
              "batch_size": args.batch_size, "learning_rate": args.learning_rate,
              "precision": args.precision, "enable_cache": not args.no_cache,
              "expert_parallel": args.expert_parallel,
              "dispatch_capacity_factor": args.dispatch_capacity_factor,
              "dispatch_recompute": args.dispatch_recompute,
              "cpu_devices": args.cpu_devices,
              "gradient_accumulation": args.gradient_accumulation,
              "examples_dir": args.examples_dir, "text_dir": args.text_dir,
              "vocab_size": args.vocab_size, "tokenizer_file": args.tokenizer,
              "text_eval_fraction": args.text_eval_fraction, "pipeline_root": args.pipeline_root,
              "metadata_path": args.metadata_path, "serving_dir": args.serving_dir,
              "metadata_mysql": getattr(args, "metadata_mysql", None)}
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


# Exit status of `run`; 2 is also argparse's for a bad command line.
EXIT_PUSHED, EXIT_FAILED, EXIT_INVALID_SETTINGS, EXIT_NOT_PUSHED = 0, 1, 2, 3


def _cmd_run(args) -> int:
    from app.console import RunConsole

    with RunConsole(verbose=args.verbose) as console:
        return _run_pipeline(args, console)


def _run_pipeline(args, console) -> int:
    from pipeline.settings import SettingsError

    try:
        settings = _settings_from_args(args)
    except (SettingsError, ValueError) as e:
        print(f"deepseek-tfx run: invalid settings: {e}", file=console.terminal_err)
        return EXIT_INVALID_SETTINGS
    from app.run_report import run_outcome
    from pipeline.local_runner import new_run_id, run_local
    from pipeline.metadata_store import MetadataStoreError, target_of

    metadata = target_of(settings)
    try:
        metadata.check()  # a wrong password or an unreachable server: one line, nothing run
    except MetadataStoreError as e:
        print(f"deepseek-tfx run: {e}", file=console.terminal_err)
        return EXIT_FAILED
    run_id = new_run_id()
    run_dir = os.path.abspath(settings.run_dir)
    log = console.attach(os.path.join(run_dir, "logs", f"run-{run_id.replace(':', '')}.log"))
    console.say(f"deepseek-tfx: running the pipeline in {run_dir}")
    console.say(f"  log: {log}")
    console.watch_components()
    try:
        run_local(settings, run_id=run_id)
    except Exception as e:  # any component's failure: a short account here, the traceback in the log
        console.log_exception(e)
        component = _report_failure(console, settings, run_id, e)
        from app.run_report import failure_lines

        _run_page(console, settings, run_id, {"component": component, "lines": failure_lines(e)})
        return EXIT_FAILED
    outcome = run_outcome(metadata, run_id)
    console.say()
    if outcome.pushed is not None and outcome.pushed.get("already_pushed") == 1:
        console.say(f"Model unchanged: already served as version {outcome.pushed.get('pushed_version')} "
                    f"in {settings.path('serving')}; nothing new pushed")
        code = EXIT_PUSHED
    elif outcome.pushed is not None:
        version = outcome.pushed.get("pushed_version")
        console.say(f"Model blessed and pushed to {settings.path('serving')}"
                    + (f" (version {version})" if version else ""))
        code = EXIT_PUSHED
    else:
        console.say("Model NOT pushed.")
        for blessing in outcome.blessings:
            verdict = "blessed" if blessing.blessed else "NOT blessed"
            console.say(f"  {blessing.component}: {verdict}")
            for failure in blessing.failures:
                console.say(f"    - {failure}")
        code = EXIT_NOT_PUSHED
    console.say(f"Inspect the run: deepseek-tfx inspect --run-dir {settings.run_dir}")
    _run_page(console, settings, run_id)
    return code


def _run_page(console, settings, run_id, failure=None) -> None:
    """The run's HTML report (report.page); a report that cannot be written
    is said in one line and changes no exit status."""
    from report.page import default_path, write_report

    try:
        path = write_report(settings.path("metadata"), default_path(os.path.abspath(settings.run_dir), run_id),
                            run_id=run_id, failure=failure)
    except Exception as e:  # noqa: BLE001
        console.log_exception(e)
        console.say(f"deepseek-tfx: could not write the run report: {type(e).__name__}: {e}")
        return
    console.say(f"Report: {path}")


def _report_failure(console, settings, run_id, error):
    """Says why the run failed; -> the failed component (None when unknown)."""
    from app.run_report import (
        failure_lines,
        find_corrupt_tfrecord,
        looks_like_bad_tfrecord,
        run_outcome,
        tfrecord_candidates,
    )

    component = console.events.running if console.events else None
    if component is None:
        try:
            from pipeline.metadata_store import target_of

            failed = run_outcome(target_of(settings), run_id).failed
            component = failed[0] if failed else None
        except Exception:  # no record of the run (it failed before any component)
            component = None
    console.say(error=True)
    console.say("deepseek-tfx: the run FAILED" + (f" in {component}:" if component else ":"), error=True)
    for line in failure_lines(error):
        console.say(f"  {line}", error=True)
    if looks_like_bad_tfrecord(error):
        corrupt = find_corrupt_tfrecord(tfrecord_candidates(settings.examples_dir, settings.path("pipeline_root")))
        if corrupt:
            console.say(f"  corrupt TFRecord file: {corrupt}", error=True)
    console.say(f"The traceback and all other output are in {console.log_path}", error=True)
    return component


def _cmd_inspect(args) -> int:
    import json

    from app.inspect_metadata import collect, render, to_dot
    from app.quiet import quiet_stderr
    from pipeline.metadata_store import MetadataStoreError

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    with quiet_stderr() as err:
        try:
            info = collect(_metadata_target(args))
        except (FileNotFoundError, MetadataStoreError, ValueError) as e:
            print(f"deepseek-tfx inspect: {e}", file=err)
            return 2
    if args.dot:
        with open(args.dot, "w") as f:
            f.write(to_dot(info))
    if args.json:
        print(json.dumps(info, indent=2, default=str))
    else:
        render(info)
    return 0


def _metadata_target(args):
    """The store `inspect` and `generate` read: --metadata-mysql, else the
    SQLite file (--metadata-path, else <run-dir>/metadata.sqlite)."""
    from pipeline.metadata_store import MetadataTarget

    return MetadataTarget.of(getattr(args, "metadata_path", None)
                             or os.path.join(args.run_dir, "metadata.sqlite"), args.metadata_mysql)


def _cmd_report(args) -> int:
    from report.gather import ReportError
    from report.page import default_path, write_report

    path = args.metadata_path or os.path.join(args.run_dir, "metadata.sqlite")
    try:
        if args.run_id is None:
            from report.gather import latest_run_id

            args.run_id = latest_run_id(path) if os.path.exists(path) else None
        out = args.out or default_path(args.run_dir, args.run_id or "latest")
        written = write_report(path, out, run_id=args.run_id)
    except (ReportError, OSError) as e:
        print(f"deepseek-tfx report: {e}", file=sys.stderr)
        return 2
    print(written)
    return 0


def _parse_prompt(text: str, index: int):
    tokens = [t.strip() for t in text.split(",")]
    if not any(tokens):
        raise ValueError(f"prompt {index} is empty; give comma-separated token ids, e.g. 1,2,3")
    try:
        return [int(t) for t in tokens if t]
    except ValueError:
        bad = next(t for t in tokens if t and not t.lstrip("-").isdigit())
        raise ValueError(f"prompt {index} holds {bad!r}, which is not an integer token id") from None


def _cmd_generate(args) -> int:
    from app.quiet import quiet_stderr

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    with quiet_stderr() as err:
        return _generate(args, err)


def _generate(args, err) -> int:
    from pipeline.metadata_store import MetadataStoreError

    # Every refusal is one line on stderr and exit code 2, never a traceback.
    try:
        if bool(args.prompt) == bool(args.text):
            raise ValueError("generate: give --prompt (token ids) or --text (a model trained on text), not both"
                             if args.prompt else "generate: give --prompt TOKEN_IDS or --text \"...\"")
        prompts = [_parse_prompt(p, i) for i, p in enumerate(args.prompt or [])]
        import warnings

        # Library version notices (google.api_core on Python 3.10) would
        # break the one-line answer.
        warnings.filterwarnings("ignore", category=FutureWarning)
        from app.serving import generate_from_pushed, generate_text_from_pushed, pushed_from_metadata

        serving = args.serving_dir or os.path.join(args.run_dir, "serving")
        if args.text:
            texts, version = generate_text_from_pushed(
                serving, args.text, args.max_new_tokens, args.temperature, args.top_k, args.seed,
                top_p=args.top_p, eos_id=args.eos_id)
            print(f"model version {version}")
            for prompt, text in zip(args.text, texts):
                print(f"{prompt}{text}" if len(args.text) == 1 else f"{prompt!r} -> {text!r}")
            return 0
        # With a shared store the model is the newest one it records as pushed.
        version_dir = pushed_from_metadata(_metadata_target(args)) if args.metadata_mysql else None
        outputs, version = generate_from_pushed(
            serving, prompts, args.max_new_tokens, args.temperature, args.top_k, args.seed,
            top_p=args.top_p, eos_id=-1 if args.eos_id is None else args.eos_id,
            version_dir=version_dir)
    except (FileNotFoundError, ValueError, MetadataStoreError) as e:
        message = " ".join(str(e).split())
        prefix = "" if message.startswith("generate: ") else "generate: "
        print(f"deepseek-tfx {prefix}{message}", file=err)
        return 2
    print(f"model version {version}")
    for prompt, out in zip(prompts, outputs):
        print(f"{prompt} -> {out}")
    return 0


# --------------------------------------------------------------------------- Kubeflow
def _add_settings_args(p) -> None:
    """The PipelineSettings flags shared by `run`, `compile` and `deploy`."""
    from model.checks import PRECISIONS
    from pipeline.settings import PipelineSettings as D  # the defaults are the settings'

    p.add_argument("--preset", help=f"model size (default {D.preset})")
    p.add_argument("--model-overrides", help='JSON of config fields, e.g. \'{"num_hidden_layers": 2}\'')
    p.add_argument("--base-model", help="fine-tune from this Hugging Face DeepSeek-V3 directory (config.json + "
                                        "*.safetensors, or a pushed version of an earlier run): the model is "
                                        "its config; overrides that change a weight shape are refused")
    p.add_argument("--data", default=D.data_kind, help="uniform | zipf | markov | copy | mixture")
    p.add_argument("--data-params", help='JSON generator parameters, e.g. \'{"order": 2}\'')
    p.add_argument("--seq-len", type=int, default=D.seq_len)
    p.add_argument("--train-examples", type=int, default=D.train_examples)
    p.add_argument("--eval-examples", type=int, default=D.eval_examples)
    p.add_argument("--examples-dir", help="use your own TFRecords (<dir>/train/*, <dir>/eval/*)")
    p.add_argument("--text-dir", help="train on your own UTF-8 text files (plain or .gz; one file = one "
                                      "document): a tokenizer is trained on them, then they are packed to --seq-len")
    p.add_argument("--vocab-size", type=int, help="with --text-dir: pieces of the trained SentencePiece BPE "
                                                  "(default 2048); it sets the model's vocab_size")
    p.add_argument("--tokenizer", help="with --text-dir: use this SentencePiece model file instead of training one")
    p.add_argument("--text-eval-fraction", type=float, default=0.1,
                   help="with --text-dir: share of the documents held out for eval")
    p.add_argument("--steps", type=int, default=D.train_steps)
    p.add_argument("--batch-size", type=int, default=D.batch_size)
    p.add_argument("--learning-rate", type=float, default=D.learning_rate)
    p.add_argument("--precision", default=D.precision, help=" | ".join(PRECISIONS))
    p.add_argument("--expert-parallel", type=int, default=D.expert_parallel,
                   help="shard the routed experts over N devices (batch over the rest)")
    p.add_argument("--dispatch-capacity-factor", type=float, default=D.dispatch_capacity_factor,
                   help="all-to-all rows per destination device as a multiple of the even share "
                        "(>= 1; fuller micro-batches run extra rounds, nothing is dropped)")
    p.add_argument("--dispatch-recompute", action=argparse.BooleanOptionalAction,
                   default=D.dispatch_recompute,
                   help="recompute the all-to-all dispatch in the backward pass (less memory; "
                        "--no-dispatch-recompute keeps its activations: faster)")
    p.add_argument("--cpu-devices", type=int, default=D.cpu_devices,
                   help="CPU devices the engine trains on, data parallel, when it has no "
                        "accelerator (default: one per core that divides --batch-size)")
    p.add_argument("--gradient-accumulation", type=int, default=D.gradient_accumulation,
                   help="micro-batches of --batch-size per optimizer step")
    p.add_argument("--thresholds", help="JSON gate thresholds (see components/validation_checks.py)")
    p.add_argument("--no-cache", action="store_true", help="re-run (or compile with caching off) every component")


def _add_pipeline_settings_args(p, required: bool = True) -> None:
    """`run`'s settings flags plus the Kubeflow ones, for `compile` and
    `deploy` (where --image and --pipeline-root are needed unless --package
    is given)."""
    from kubeflow import compile as kfp

    _add_settings_args(p)
    p.add_argument("--serving-dir", help="where Pusher pushes (default <pipeline-root>/serving)")
    # Kubeflow.
    p.add_argument("--image", required=required,
                   help="image with the locked environment and this package (docker/Dockerfile)")
    p.add_argument("--trainer-image", help="image for the Trainer only (docker/Dockerfile.gpu); default --image")
    p.add_argument("--pipeline-root", required=required,
                   help="artifact root every pod reads and writes: gs://..., s3://... or a mounted path")
    p.add_argument("--platform", choices=kfp.PLATFORMS, default=kfp.PLATFORMS[0],
                   help="kfp: open-source Kubeflow Pipelines (the baseline is the latest pushed model: its "
                        "backend cannot run TFX Resolvers); vertex: Vertex AI Pipelines")
    p.add_argument("--gpu-type", help="Trainer accelerator (default " + ", ".join(
        f"{gpu} for {platform}" for platform, gpu in kfp.DEFAULT_GPU_TYPE.items()) + ")")
    p.add_argument("--gpu-count", type=int, default=kfp.DEFAULT_GPU_COUNT, help="Trainer accelerators; 0 = none")
    p.add_argument("--cpu", default=kfp.DEFAULT_CPU, help="Trainer CPU limit (e.g. 8, 500m)")
    p.add_argument("--memory", default=kfp.DEFAULT_MEMORY, help="Trainer memory limit (e.g. 32G, 30Gi)")
    p.add_argument("--beam-runner", default=kfp.BEAM_RUNNERS[0], choices=kfp.BEAM_RUNNERS)
    p.add_argument("--beam-arg", action="append",
                   help="a Beam pipeline argument, written --beam-arg=--flag=value (repeatable)")
    p.set_defaults(run_dir="runs/default", metadata_path=None)


def _compile_from_args(args, output: str) -> str:
    from kubeflow.compile import beam_pipeline_args, beam_warnings, compile_pipeline

    settings = _settings_from_args(args)
    beam_args = beam_pipeline_args(args.beam_runner, args.beam_arg or (), settings.beam_pipeline_args)
    for note in beam_warnings(args.beam_runner, beam_args):
        print(f"deepseek-tfx: note: {note}", file=sys.stderr)
    if args.gpu_count and not args.trainer_image:
        print("deepseek-tfx: note: the Trainer requests a GPU but runs --image; build "
              "docker/Dockerfile.gpu and pass --trainer-image for CUDA", file=sys.stderr)
    return compile_pipeline(settings, output, image=args.image, pipeline_root=args.pipeline_root,
                            gpu_type=args.gpu_type, gpu_count=args.gpu_count, cpu=args.cpu,
                            memory=args.memory, beam_args=beam_args, trainer_image=args.trainer_image,
                            platform=args.platform)


def _cmd_compile(args) -> int:
    from kubeflow.compile import CompileError
    from pipeline.settings import SettingsError

    try:
        path = _compile_from_args(args, args.output)
    except (SettingsError, CompileError, ValueError) as e:
        print(f"deepseek-tfx compile: {e}", file=sys.stderr)
        return 2
    print(f"deepseek-tfx: compiled the pipeline to {path}")
    return 0


def _cmd_deploy(args) -> int:
    import shutil
    import tempfile

    from kubeflow.compile import CompileError
    from kubeflow.deploy import DeployError, check_reachable, deploy_compiled, parse_params
    from pipeline.settings import SettingsError

    token = args.token or os.environ.get("KFP_TOKEN")
    try:
        params = parse_params(args.param or [])
        if args.package:
            from kubeflow.compile import load_pipeline_job
            from kubeflow.deploy import check_params

            check_params(load_pipeline_job(args.package)["pipelineSpec"], params)
        elif not (args.image and args.pipeline_root):
            raise CompileError("--image and --pipeline-root are required to compile (or pass --package)")
        # Reachability and auth first: a bad host costs no compile and leaves nothing behind.
        check_reachable(args.host, token, args.cookie)
        with tempfile.TemporaryDirectory(prefix="deepseek-tfx-deploy-") as tmp:
            if args.package:
                compiled = args.package
            else:
                compiled = _compile_from_args(args, os.path.join(tmp, "deepseek-tfx.json"))
            run = deploy_compiled(compiled, args.host, tmp, experiment=args.experiment, run_name=args.run_name,
                                  params=params, namespace=args.namespace, token=token, cookie=args.cookie,
                                  preflight=False)
            if args.output and not args.package:
                os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
                shutil.copyfile(compiled, args.output)
    except (SettingsError, CompileError, DeployError, ValueError, OSError) as e:
        print(f"deepseek-tfx deploy: {' '.join(str(e).split())}", file=sys.stderr)
        return 1
    print(f"deepseek-tfx: run {run['run_id']} created in experiment {run['experiment']}: {run['url']}")
    return 0


def _cmd_plan(args) -> int:
    from training.plan import run_from_args

    return run_from_args(args)


def _add_mysql_arg(p) -> None:
    p.add_argument("--metadata-mysql", metavar="mysql://USER@HOST:PORT/DB",
                   help="ML Metadata in this MySQL/MariaDB database instead of SQLite (created on first "
                        "use; password from $DEEPSEEK_TFX_MYSQL_PASSWORD; ?unix_socket=PATH for a socket)")


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

    run = sub.add_parser("run", help="run the whole pipeline locally (LocalDagRunner)",
                         epilog=f"exit status: {EXIT_PUSHED} pushed, {EXIT_NOT_PUSHED} completed but not pushed "
                                f"(not blessed), {EXIT_FAILED} failed, {EXIT_INVALID_SETTINGS} invalid settings")
    run.add_argument("--run-dir", default="runs/default",
                     help="pipeline root, ML Metadata and pushed models go here")
    _add_settings_args(run)
    run.add_argument("--beam-arg", action="append", help="a Beam pipeline argument (repeatable)")
    run.add_argument("--pipeline-root")
    run.add_argument("--metadata-path")
    _add_mysql_arg(run)
    run.add_argument("--serving-dir")
    run.add_argument("--verbose", action="store_true",
                     help="show third-party output (warnings, TFX/absl logging, TensorFlow's C++ lines) on "
                          "the terminal instead of in the run's log file (<run-dir>/logs/)")
    run.set_defaults(func=_cmd_run)

    inspect = sub.add_parser("inspect", help="show a run's ML Metadata record")
    inspect.add_argument("--run-dir", default="runs/default")
    inspect.add_argument("--metadata-path")
    _add_mysql_arg(inspect)
    inspect.add_argument("--json", action="store_true", help="machine-readable output")
    inspect.add_argument("--dot", help="also write the lineage graph as Graphviz to this file")
    inspect.set_defaults(func=_cmd_inspect)

    rep = sub.add_parser("report", help="write a run's report: one self-contained HTML page")
    rep.add_argument("--run-dir", default="runs/default")
    rep.add_argument("--metadata-path")
    rep.add_argument("--run-id", help="the pipeline run (default: the newest in the store)")
    rep.add_argument("--out", help="the HTML file (default <run-dir>/reports/run-<id>.html)")
    rep.set_defaults(func=_cmd_report)

    gen = sub.add_parser("generate", help="sample from the latest pushed SavedModel")
    gen.add_argument("--run-dir", default="runs/default")
    gen.add_argument("--serving-dir")
    _add_mysql_arg(gen)
    gen.add_argument("--prompt", action="append",
                     help="comma-separated token ids (repeat for a batch)")
    gen.add_argument("--text", action="append",
                     help="a text prompt for a model trained on text (repeat for a batch); prints the "
                          "prompt and its continuation")
    gen.add_argument("--max-new-tokens", type=int, default=16)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-k", type=int, default=0, help="0 = off")
    gen.add_argument("--top-p", type=float, default=1.0, help="nucleus mass in (0, 1]; 1 = off")
    gen.add_argument("--eos-id", type=int, help="stop a sequence after this token")
    gen.add_argument("--seed", type=int, default=0)
    gen.set_defaults(func=_cmd_generate)

    comp = sub.add_parser("compile", help="compile the pipeline for Kubeflow Pipelines (KFP v2 JSON)")
    comp.add_argument("--output", required=True, help="the PipelineJob JSON to write")
    _add_pipeline_settings_args(comp)
    comp.set_defaults(func=_cmd_compile)

    dep = sub.add_parser("deploy", help="compile and submit a run to Kubeflow Pipelines")
    dep.add_argument("--host", required=True, help="KFP API/UI URL, e.g. http://localhost:8080")
    dep.add_argument("--experiment", help="experiment (created if missing; default 'Default')")
    dep.add_argument("--run-name")
    dep.add_argument("--param", action="append", help="pipeline parameter NAME=VALUE (repeatable)")
    dep.add_argument("--namespace", help="Kubeflow profile namespace (multi-user deployments)")
    dep.add_argument("--token", help="bearer token (default $KFP_TOKEN)")
    dep.add_argument("--cookie", help="auth cookie, e.g. authservice_session=...")
    dep.add_argument("--package", help="submit this compiled JSON instead of compiling")
    dep.add_argument("--output", help="also keep the compiled JSON here (after a successful submit)")
    _add_pipeline_settings_args(dep, required=False)
    dep.set_defaults(func=_cmd_deploy)

    from training.plan import add_arguments as add_plan_arguments

    plan = sub.add_parser("plan", help="compile one training step on virtual CPU devices and show "
                                       "the mesh, the bytes per device and the collectives per step")
    add_plan_arguments(plan)
    plan.set_defaults(func=_cmd_plan)
    return parser


def main(argv=None) -> int:
    _backend_default()
    args = build_parser().parse_args(argv)
    return args.func(args)


def run_and_exit(argv=None) -> None:
    """The `deepseek-tfx` command: main(), then a prompt exit. With every
    file written and closed, tearing the interpreter down (the TensorFlow,
    Beam and TFX modules) still took 3-5 s after a run: the exit handlers
    run and the streams are flushed, the module teardown is skipped."""
    import atexit
    import logging

    code = main(argv)
    if code is not None and not isinstance(code, int):  # sys.exit's meaning of a message
        print(code, file=sys.stderr)
        code = 1
    atexit._run_exitfuncs()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code or 0)


if __name__ == "__main__":
    run_and_exit()
