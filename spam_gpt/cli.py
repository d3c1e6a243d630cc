"""The ``spam-gpt`` command: parses arguments, calls the library, prints results."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from spam_gpt import __version__, console
from spam_gpt.config import PRESETS, TrainConfig
from spam_gpt.precision import INFERENCE_PRECISIONS, require_cpu_for_int8
from spam_gpt.stopping import Terminated

if TYPE_CHECKING:
    from spam_gpt.labelled import DataSpec
    from spam_gpt.sweep import SweepSettings

EXPERIMENT = "spam-gpt"
REGISTERED_NAME = "spam-gpt"
MAX_FAILURES = 3
# `spam-gpt train`'s options that only training on Ray Train uses, with their defaults.
RAY_TRAIN_ONLY = {
    "tracking_uri": None,
    "experiment": EXPERIMENT,
    "register_as": REGISTERED_NAME,
    "max_failures": MAX_FAILURES,
    "storage_path": None,
    "cpus_per_worker": None,
    "runtime_env": None,
}

EXAMPLES = """examples:
  spam-gpt prepare --out data/
  spam-gpt train --preset tiny --output runs/tiny
  spam-gpt train --preset tiny --data messages.parquet --label-column category --output runs/mine
  spam-gpt sweep --preset tiny --grid book --output runs/book --register-as spam-best
  spam-gpt classify --model runs/tiny/model "You won a prize! Call now" "See you at 6?"
  spam-gpt evaluate --model runs/tiny/model
"""


def add_config_options(parser: argparse.ArgumentParser) -> None:
    """One ``--option`` per :class:`TrainConfig` field, overriding the preset's value."""
    group = parser.add_argument_group("preset overrides (default: the preset's value)")
    for f in dataclasses.fields(TrainConfig):
        if f.name == "preset":
            continue
        kind = {"int": int, "float": float}.get(str(f.type), str)
        group.add_argument(
            f"--{f.name.replace('_', '-')}",
            dest=f.name,
            type=kind,
            default=None,
            help=f.metadata.get("help", f"chapter default: {f.default}"),
        )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="spam-gpt",
        description="Fine-tune GPT-2 into an SMS spam classifier (chapter 6 of 'Build a Large "
        "Language Model (From Scratch)') and use it.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"spam-gpt {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    prepare = commands.add_parser(
        "prepare",
        help="write the chapter's balanced train/validation/test splits",
        description="Balance the SMS Spam Collection (747 ham, 747 spam), shuffle and split "
        "it 70/10/20 exactly as the chapter does, and write CSV and Parquet files.",
    )
    prepare.add_argument("--out", required=True, help="folder for train/validation/test files")
    add_source_options(prepare)

    train = commands.add_parser(
        "train",
        help="fine-tune a classifier",
        description="Fine-tune per a preset: 'chapter' (pretrained gpt2-small, the book's "
        "recipe), 'fast' (the same, per-batch padding, last real token), 'tiny' (a small "
        "random model that trains on a laptop CPU in under a minute).",
    )
    train.add_argument(
        "--preset", choices=list(PRESETS), default="chapter", help="default: chapter"
    )
    train.add_argument("--output", help="folder for model/, metrics.json, plots (required)")
    add_data_options(train)
    add_config_options(train)
    add_ray_train_options(train)

    sweep = commands.add_parser(
        "sweep",
        help="run a grid of training runs on Ray Tune and keep the best",
        description="Train every combination of a grid of training options (each trial a Ray "
        "Train run, tracked as a child of one MLflow run), then summarise them: a table "
        "(summary.csv, summary.md), a plot of test accuracy per variant, and the best trial, "
        "optionally registered. Data, preset and option flags apply to every trial.",
        epilog="example:\n  spam-gpt sweep --preset tiny --grid book --epochs 2 --output "
        "runs/book --register-as spam-best\n  spam-gpt sweep --resume runs/book      # after "
        "Ctrl-C, SIGTERM or a lost driver",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sweep.add_argument(
        "--preset", choices=list(PRESETS), default="chapter", help="default: chapter"
    )
    add_sweep_options(sweep)
    add_data_options(sweep)
    add_config_options(sweep)

    classify = commands.add_parser(
        "classify",
        help="label messages",
        description="Print each message's label and that label's probability.",
    )
    add_model_options(classify)
    classify.add_argument(
        "texts",
        nargs="+",
        metavar="TEXT",
        help="messages to classify; - reads one message per line from standard input",
    )
    classify.add_argument(
        "--json", action="store_true", help="print JSON lines, with every label's probability"
    )

    evaluate = commands.add_parser(
        "evaluate",
        help="accuracy and per-label precision/recall/F1 of a model",
        description="Evaluate a model on the chapter's splits, or on your own labelled data "
        "split exactly as `spam-gpt train` splits it with the same options.",
    )
    add_model_options(evaluate)
    add_data_options(evaluate)
    evaluate.add_argument(
        "--every-row",
        action="store_true",
        help="score every row of --data (messages the model never trained on, such as a "
        "newly labelled batch) instead of the test split `spam-gpt train` would cut from them",
    )

    score = commands.add_parser(
        "score",
        help="classify Parquet/CSV message archives with Ray Data",
        description="Classify every row of Parquet files (a file, a folder, hive partitions, "
        "globs, several paths, local or s3://, gs://, file://) or the chapter's CSV/TSV files "
        "and write Parquet with the input columns plus label, spam_probability, model and "
        "score_error. Rows that cannot be scored are kept with score_error set.",
    )
    add_model_options(score)
    score.add_argument("--input", required=True, nargs="+", metavar="IN", help="input paths")
    score.add_argument("--output", required=True, help="output folder of Parquet files")
    score.add_argument(
        "--text-column",
        help="column with the messages (default: 'text', or 'Text'); A.B for field B of a "
        "struct column A",
    )
    score.add_argument("--batch-size", type=int, default=512, help="rows per batch (512)")
    score.add_argument(
        "--concurrency",
        type=int,
        default=1,
        help="model actors (default 1); on CPUs one per core with --cpus-per-actor 1 is fastest",
    )
    score.add_argument(
        "--cpus-per-actor",
        type=int,
        default=1,
        help="CPUs (and torch threads) per actor, which reads, scores and writes its share "
        "(default 1)",
    )
    score.add_argument("--gpu", action="store_true", help="one GPU per actor")
    add_cluster_options(score)
    written = score.add_mutually_exclusive_group()
    written.add_argument(
        "--overwrite", action="store_true", help="replace an existing --output, or a stopped job's"
    )
    written.add_argument(
        "--resume",
        action="store_true",
        help="finish a job that stopped part way (killed, or its cluster lost): run the same "
        "command plus --resume; the parts it scored are kept and the rest scored, each input "
        "row once",
    )

    serve = commands.add_parser(
        "serve",
        help="run the HTTP classification endpoint on Ray Serve",
        description="Serve POST /classify, POST /classify/batch, GET /healthz, GET /model, a "
        "web page at / and the API docs at /docs. Blocks until Ctrl-C, then shuts down.",
    )
    add_model_options(serve)
    serve.add_argument("--host", default="127.0.0.1", help="default 127.0.0.1")
    serve.add_argument("--port", type=int, default=8000, help="default 8000")
    serve.add_argument("--replicas", type=int, help="fixed number of replicas (default 1)")
    serve.add_argument("--min-replicas", type=int, help="autoscaling lower bound")
    serve.add_argument("--max-replicas", type=int, help="autoscaling upper bound")
    serve.add_argument("--threads", type=int, default=1, help="CPUs and torch threads per replica")
    serve.add_argument(
        "--max-batch-size",
        type=int,
        default=32,
        help="most requests per forward pass (default 32); a request that finds the model "
        "idle starts at once, those arriving during a pass form the next one",
    )
    serve.add_argument("--no-batching", action="store_true", help="one request per forward pass")
    serve.add_argument(
        "--api-key-file",
        help="require Authorization: Bearer KEY on /classify and /model, KEY one of this "
        "file's lines (also read: SPAM_GPT_API_KEYS, comma-separated). On a cluster the path "
        "must exist on every node (a mounted secret). Without keys the endpoint is open",
    )
    serve.add_argument(
        "--reload-interval-s",
        type=float,
        default=30.0,
        help="with --model models:/NAME@ALIAS, how often each replica checks where the alias "
        "points and switches to a new version without downtime (default 30; 0: never)",
    )
    serve.add_argument(
        "--metrics-port",
        type=int,
        help="port of the local Ray's Prometheus metrics (default: Ray picks one and the "
        "command prints it); on a cluster, each node's --metrics-export-port",
    )
    serve.add_argument(
        "--high-throughput",
        action="store_true",
        help="Ray Serve's high-throughput ingress: HAProxy on the port and replicas answering "
        "HTTP directly, far less CPU per request than Serve's Python proxy (Linux). For the "
        "local Ray this command starts; on a cluster, set RAY_SERVE_ENABLE_HA_PROXY=1 and "
        "RAY_SERVE_THROUGHPUT_OPTIMIZED=1 where its nodes start instead",
    )
    serve.add_argument("--gpu", action="store_true", help="one GPU per replica")
    serve.add_argument(
        "--allow-origin",
        action="append",
        metavar="ORIGIN",
        help="let web apps served from ORIGIN (such as https://app.example.com) call the "
        "endpoint from the browser (CORS); repeat for more; * for any",
    )
    add_cluster_options(serve)
    serve.add_argument(
        "--detach", action="store_true", help="deploy and return, leaving the app running"
    )

    generate = commands.add_parser(
        "generate",
        help="greedy text generation with GPT-2 weights",
        description="Continue a prompt with pretrained GPT-2 weights, greedily: the book's "
        "check that the weights loaded into its GPT module.",
    )
    generate.add_argument(
        "--weights",
        required=True,
        help="a folder with config.json and model.safetensors, or a name (gpt2-small, "
        "gpt2-medium, gpt2-large, gpt2-xl) from the Hugging Face cache or Hub",
    )
    generate.add_argument("--prompt", required=True, help="the text to continue")
    generate.add_argument(
        "--max-new-tokens", type=int, default=20, help="tokens to add (default 20)"
    )
    return parser


def json_object(text: str) -> dict:
    """An argparse type: a JSON object, such as a Ray runtime environment."""
    try:
        value = json.loads(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"not JSON: {error}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object")
    return value


def add_cluster_options(parser) -> None:
    parser.add_argument("--address", help="Ray cluster to join (default: RAY_ADDRESS, else local)")
    parser.add_argument(
        "--runtime-env",
        type=json_object,
        metavar="JSON",
        help='Ray runtime environment when joining a cluster, e.g. \'{"pip": ["torch"]}\' '
        "(jobs submitted with `ray job submit` get theirs from the submission)",
    )
    parser.add_argument(
        "--verbose",
        action="store_true",
        help="show Ray's and MLflow's own logs here (default: in a log file named at the end)",
    )


def add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        required=True,
        help="a checkpoint folder (DIR/model), runs:/<run id>/model or models:/<name>/<version "
        "or alias>",
    )
    parser.add_argument(
        "--tracking-uri",
        help="MLflow tracking URI for runs:/ and models:/ (default: "
        "MLFLOW_TRACKING_URI, else sqlite:///mlflow.db here)",
    )
    parser.add_argument(
        "--precision",
        choices=INFERENCE_PRECISIONS,
        default="fp32",
        help="fp32 (default) matches training exactly; bf16 is ~3x faster on CPUs with "
        "AVX512-BF16 or AMX, probabilities within ~0.01; int8 (CPUs only) quantises the "
        "transformer's Linear layers, ~3x faster for gpt2-small on any x86 CPU",
    )


def add_ray_train_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "Ray Train and MLflow (used when --workers, --address or --resume is given)"
    )
    add_trainer_options(group, cpus_help="default: this machine's CPUs / N")
    group.add_argument(
        "--register-as",
        default=REGISTERED_NAME,
        help=f"registered model name for the trained model (default {REGISTERED_NAME}; '' to "
        "skip registering)",
    )
    group.add_argument(
        "--storage-path",
        help="where Ray keeps checkpoints (shared storage such as s3:// on a "
        "multi-node cluster; default: OUTPUT/ray)",
    )
    group.add_argument(
        "--resume",
        metavar="RUN_ID_OR_DIR",
        help="continue a stopped job from its last epoch checkpoint (its --output folder or "
        "MLflow run id); other settings come from that job",
    )


def add_trainer_options(group, cpus_help: str) -> None:
    """How one training run uses Ray and where MLflow tracks it (train and sweep)."""
    group.add_argument(
        "--workers",
        type=int,
        help="train on N Ray Train workers with DistributedDataParallel; the batch size stays "
        "global (each worker takes batch_size / N)",
    )
    group.add_argument("--cpus-per-worker", type=int, help=cpus_help)
    group.add_argument("--gpu", action="store_true", help="one GPU per worker, NCCL, bf16 autocast")
    add_cluster_options(group)
    group.add_argument(
        "--tracking-uri", help="MLflow tracking URI (default: sqlite:///mlflow.db here)"
    )
    group.add_argument(
        "--experiment", default=EXPERIMENT, help=f"MLflow experiment name (default {EXPERIMENT})"
    )
    group.add_argument(
        "--max-failures",
        type=int,
        default=MAX_FAILURES,
        help=f"worker failures to recover from (default {MAX_FAILURES})",
    )


def add_sweep_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--grid",
        metavar="FILE.yaml|book",
        help="training options with lists of values, e.g. 'lr: [0.001, 0.0005]' and "
        "'seed: [1, 2, 3]' (every combination runs, once per seed); 'book': the book's table "
        "(trainable x token x padding)",
    )
    parser.add_argument("--output", help="folder for the summary and each trial (required)")
    parser.add_argument(
        "--resume",
        metavar="OUTPUT",
        help="continue a stopped sweep (its --output folder): finished trials are kept, the "
        "rest run, each unfinished one from its last epoch checkpoint; other settings come "
        "from that sweep",
    )
    parser.add_argument(
        "--trials-at-once",
        type=int,
        help="trials running together (default: as many as the cluster's CPUs fit)",
    )
    group = parser.add_argument_group("every trial's Ray Train run and MLflow")
    add_trainer_options(group, cpus_help="CPUs per worker (default 1)")
    group.add_argument(
        "--register-as",
        help="register the best trial's model (validation accuracy; ties: fewer trainable "
        "parameters) under this name",
    )


def add_data_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "your own data (default: the chapter's SMS Spam Collection splits)"
    )
    group.add_argument(
        "--data",
        nargs="+",
        metavar="PATH",
        help="labelled messages: Parquet files, folders (hive partitions), globs, s3://, gs://, "
        "file:// or CSV/TSV; or the folder `spam-gpt prepare` writes (the chapter's splits)",
    )
    group.add_argument("--text-column", help="column with the messages (default: text, any case)")
    group.add_argument("--label-column", help="column with the labels (default: label, any case)")
    group.add_argument(
        "--split-column", help="column whose values (train, validation, test) say each row's split"
    )
    group.add_argument(
        "--validation-data", nargs="+", metavar="PATH", help="validation rows (with --test-data)"
    )
    group.add_argument(
        "--test-data", nargs="+", metavar="PATH", help="test rows (with --validation-data)"
    )
    group.add_argument(
        "--split",
        metavar="TRAIN,VAL",
        help="otherwise: a stratified split with these fractions, test the rest (default "
        "0.7,0.1, the chapter's)",
    )
    group.add_argument(
        "--split-seed", type=int, help="seed of that split (default 123); --seed does not move it"
    )
    group.add_argument(
        "--labels",
        type=lambda text: [label.strip() for label in text.split(",")],
        metavar="A,B,...",
        help="the labels in this order; rows with others are an error (default: the training "
        "split's labels, sorted)",
    )


DATA_OPTIONS = (
    "text_column",
    "label_column",
    "split_column",
    "validation_data",
    "test_data",
    "split",
    "split_seed",
    "labels",
)


def data_spec_from_args(args: argparse.Namespace):
    """The ``--data`` options as a :class:`~spam_gpt.labelled.DataSpec` (None: the
    chapter's bundled splits)."""
    from spam_gpt.labelled import DataSpec, parse_fractions

    given = {name: getattr(args, name) for name in DATA_OPTIONS if getattr(args, name) is not None}
    if not args.data:
        if given:
            options = ", ".join(f"--{name.replace('_', '-')}" for name in given)
            raise ValueError(f"{options} describe(s) --data; give --data PATH too")
        return None
    if "split" in given:
        given["split"] = parse_fractions(given["split"])
    return DataSpec(paths=list(args.data), **given)


def add_source_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--source", help="SMSSpamCollection file, UCI zip or URL (default: the bundled copy)"
    )
    parser.add_argument("--sha256", help="expected SHA-256 of the collection file")


def cmd_prepare(args: argparse.Namespace) -> None:
    from spam_gpt.corpus import build_splits, read_source_bytes, write_splits

    splits = build_splits(read_source_bytes(args.source, args.sha256))
    for path in write_splits(splits, args.out):
        print(path)
    print(", ".join(f"{name}: {len(frame)} rows" for name, frame in splits.items()))


def cmd_train(args: argparse.Namespace) -> None:
    if not (args.output or args.resume):
        raise ValueError("--output is required")
    if args.resume or args.workers or args.address or args.gpu:
        return train_on_ray(args)
    given = [
        f"--{name.replace('_', '-')}"
        for name, unset in RAY_TRAIN_ONLY.items()
        if getattr(args, name) != unset
    ]
    if given:  # in process nothing would use them: say so rather than drop them
        raise ValueError(
            f"{', '.join(given)} {'take' if len(given) > 1 else 'takes'} effect on Ray Train, "
            "which tracks the run in MLflow: "
            "add --workers 1 (or more); without --workers, training runs in this process "
            "and tracks nothing"
        )
    from spam_gpt.finetune import InMemoryData, finetune, write_outputs
    from spam_gpt.labelled import labelled_inputs, load_in_process

    cfg = config_from_args(args)
    plan, frames = load_in_process(labelled_inputs(data_spec_from_args(args)))
    report_data(plan)
    try:
        result = finetune(cfg, InMemoryData(frames, plan.labels))
    except KeyboardInterrupt:  # Ctrl-C, SIGTERM
        print(
            "spam-gpt train: nothing was saved: training in this process keeps no checkpoints "
            "(with --workers 1 it runs on Ray Train, which keeps one per epoch and continues "
            "with --resume)",
            file=sys.stderr,
        )
        raise
    outputs = write_outputs(result, args.output)
    print_summary(result.metrics)
    print(f"Model: {outputs['model']}\nMetrics and plots: {Path(args.output)}")


def report_data(plan) -> None:
    print(f"Data: {plan.describe()}")
    skipped = plan.skipped_line()
    if skipped:
        print(skipped)


def config_overrides(args: argparse.Namespace) -> dict:
    """The training options given on the command line (None: the preset's)."""
    return {
        f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if f.name != "preset"
    }


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    from spam_gpt.config import resolve_config

    return resolve_config(args.preset, config_overrides(args))


def train_on_ray(args: argparse.Namespace) -> int:
    from ray.train import TrainingFailedError

    from spam_gpt.distributed import (
        connect_for_training,
        find_job,
        new_job,
        prepare_data,
        refuse_finished,
        run_job,
        weights_for_workers,
    )
    from spam_gpt.tracking import absolute_tracking_uri, answering, ui_for

    tracking_uri = answering(absolute_tracking_uri(args.tracking_uri))
    if args.resume:
        job = find_job(args.resume, tracking_uri)
        refuse_finished(job)
        spec, workers, cpus, gpu = job.data_spec(), job.workers, job.cpus_per_worker, job.gpu
    else:
        cfg = config_from_args(args)
        spec = data_spec_from_args(args)
        workers = args.workers or 1
        cpus = args.cpus_per_worker or max(1, (os.cpu_count() or 1) // workers)
        gpu = args.gpu
    connect_for_training(args.address, workers, cpus, args.runtime_env, gpu)
    inputs, plan = prepare_data(spec)
    report_data(plan)
    weights = weights_for_workers((TrainConfig(**job.config) if args.resume else cfg).weights)
    if not args.resume:
        job = new_job(
            cfg,
            plan,
            output=args.output,
            workers=workers,
            cpus_per_worker=cpus,
            gpu=args.gpu,
            tracking_uri=tracking_uri,
            experiment=args.experiment,
            register_as=args.register_as or None,
            max_failures=args.max_failures,
            storage_path=args.storage_path,
            data=spec,
        )
    print(f"MLflow run {job.run_id} in experiment {job.experiment!r} at {job.tracking_uri}")
    try:
        metrics = run_job(job, inputs, plan, weights)
    except (TrainingFailedError, KeyboardInterrupt) as error:  # Ctrl-C, SIGTERM
        stopped = isinstance(error, KeyboardInterrupt)
        ended = "stopped" if stopped else f"failed ({type(error).__name__})"
        print(
            f"spam-gpt train: training {ended}; continue it with `spam-gpt train --resume "
            f"{job.output}`",
            file=sys.stderr,
        )
        if stopped:
            raise
        return 1
    print_summary(metrics)
    print(
        f"Model: {Path(job.output) / 'model'}\nMetrics and plots: {job.output}\n"
        f"MLflow UI: {ui_for(job.tracking_uri)}"
    )
    return 0


@dataclasses.dataclass
class SweepLaunch:
    """A sweep, new or resumed, ready to start once Ray is connected: ``run(inputs, plan,
    trials_at_once)`` runs it."""

    settings: SweepSettings
    data: DataSpec | None  # None: the chapter's splits
    trials: int
    trials_at_once: int | None  # None: as many as the cluster's CPUs fit
    register_as: str | None
    run: Callable


def cmd_sweep(args: argparse.Namespace) -> int:
    import ray

    from spam_gpt.distributed import prepare_data
    from spam_gpt.ray_cluster import connect, require_cpus, require_gpus
    from spam_gpt.sweep import describe, stopped_message
    from spam_gpt.tracking import answering

    sweep = resumed_sweep(args) if args.resume else new_sweep(args)
    settings = sweep.settings
    answering(settings.tracking_uri)
    per_trial = settings.workers * settings.cpus_per_worker + 1  # and one for Ray Data
    least = min(sweep.trials_at_once or 1, sweep.trials)  # trials that must fit at once
    wanted = per_trial * least
    connect(args.address, num_cpus=wanted, runtime_env=args.runtime_env)
    require_cpus(wanted, "--trials-at-once x (--workers x --cpus-per-worker + 1 for Ray Data)")
    if settings.gpu:
        require_gpus(settings.workers * least, "worker")
    fits = int(ray.cluster_resources().get("CPU", 0) // per_trial)
    inputs, plan = prepare_data(sweep.data)
    report_data(plan)
    try:
        result = sweep.run(inputs, plan, min(sweep.trials_at_once or fits, sweep.trials))
    except KeyboardInterrupt:  # Ctrl-C, SIGTERM
        print(stopped_message(settings.output), file=sys.stderr)
        raise
    print(describe(result, sweep.register_as))
    output = Path(settings.output)
    print(f"Summary: {output / 'summary.md'}, trials in {output / 'trials'}")
    return 0 if result.best is not None else 1


def new_sweep(args: argparse.Namespace) -> SweepLaunch:
    """A new sweep from the command line, every setting checked before Ray starts."""
    from spam_gpt.grid import expand_grid, load_grid
    from spam_gpt.sweep import SweepSettings, refuse_unfinished, run_sweep
    from spam_gpt.tracking import absolute_tracking_uri

    if not (args.grid and args.output):
        raise ValueError("--grid and --output are required (or --resume OUTPUT)")
    if args.trials_at_once is not None and args.trials_at_once < 1:
        raise ValueError("--trials-at-once must be at least 1")
    refuse_unfinished(args.output)
    overrides = config_overrides(args)
    grid = load_grid(args.grid)
    trials = expand_grid(grid, args.preset, overrides)
    spec = data_spec_from_args(args)
    settings = SweepSettings(
        output=str(Path(args.output).resolve()),
        workers=args.workers or 1,
        cpus_per_worker=args.cpus_per_worker or 1,
        gpu=args.gpu,
        tracking_uri=absolute_tracking_uri(args.tracking_uri),
        experiment=args.experiment,
        max_failures=args.max_failures,
        data=None if spec is None else dataclasses.asdict(spec),
    )
    params = {
        "grid": json.dumps(grid),
        "preset": args.preset,
        "trials": len(trials),
        "workers_per_trial": settings.workers,
        **{name: value for name, value in overrides.items() if value is not None},
    }

    def run(inputs, plan, at_once: int):
        return run_sweep(
            trials,
            settings,
            inputs,
            plan,
            trials_at_once=at_once,
            params={**params, "trials_at_once": at_once},
            register_as=args.register_as,
        )

    return SweepLaunch(settings, spec, len(trials), args.trials_at_once, args.register_as, run)


def resumed_sweep(args: argparse.Namespace) -> SweepLaunch:
    """A stopped sweep, from what it saved in its output folder."""
    from spam_gpt.labelled import DataSpec
    from spam_gpt.sweep import SweepSettings, load_sweep, resume_sweep

    saved = load_sweep(args.resume)  # its grid and settings; ray_config.yaml's are not used
    if saved.finished:
        raise ValueError(
            f"the sweep in {args.resume} finished; its summary is in "
            f"{Path(args.resume) / 'summary.md'}"
        )
    settings = SweepSettings(**saved.settings)
    spec = None if settings.data is None else DataSpec(**settings.data)
    return SweepLaunch(
        settings,
        spec,
        len(saved.trials),
        saved.trials_at_once,
        saved.register_as,
        lambda inputs, plan, _: resume_sweep(saved, inputs, plan),
    )


def kept_epoch_note(metrics: dict) -> str:
    """Which epoch's weights a run kept when ``--keep best`` kept an earlier one than its
    last (else ""): the final accuracies are that epoch's, not the last epoch line's."""
    kept, trained = metrics.get("kept_epoch"), metrics.get("epochs_trained")
    if kept is None or kept == trained:
        return ""
    return f"Kept the weights of epoch {kept} of {trained}, the best on validation (--keep best)"


def print_summary(metrics: dict) -> None:
    if note := kept_epoch_note(metrics):
        print(note)
    print(
        f"Training accuracy: {metrics['train_accuracy'] * 100:.2f}%\n"
        f"Validation accuracy: {metrics['validation_accuracy'] * 100:.2f}%\n"
        f"Test accuracy: {metrics['test_accuracy'] * 100:.2f}%"
    )
    if "spam_precision" in metrics:
        print(
            f"Spam precision {metrics['spam_precision'] * 100:.2f}%, "
            f"recall {metrics['spam_recall'] * 100:.2f}%, F1 {metrics['spam_f1'] * 100:.2f}%"
        )
    print_scores(metrics, "support (test)")


def print_scores(metrics: dict, support: str) -> None:
    """The per-label table and macro F1."""
    per_class = metrics["per_class"]
    width = max(len("label"), *(len(label) for label in per_class))
    print(f"{'label':<{width}}  precision  recall      F1  {support}")
    for label, scores in per_class.items():
        print(
            f"{label:<{width}}  {scores['precision']:>9.2%}  {scores['recall']:>6.2%}  "
            f"{scores['f1']:>6.2%}  {scores['support']:>7,}"
        )
    print(f"Macro F1: {metrics['macro_f1'] * 100:.2f}%")


def cmd_classify(args: argparse.Namespace) -> None:
    from spam_gpt.model_ref import load_predictor

    if args.texts == ["-"]:  # a file of messages, piped in
        texts, name = sys.stdin.read().splitlines(), "line"
    else:
        texts, name = args.texts, "TEXT"
    if not texts:
        raise ValueError("standard input holds no messages; give one per line")
    blank = [str(number) for number, text in enumerate(texts, 1) if not text.strip()]
    if blank:  # as `score` flags such a row and `serve` refuses it
        shown = ", ".join(blank[:10]) + (", …" if len(blank) > 10 else "")
        raise ValueError(f"{name} {shown} of {len(texts)} is blank; give each message some text")
    predictor = load_predictor(args.model, args.tracking_uri, precision=args.precision)
    for text, prediction in zip(texts, predictor.predict(texts)):
        if args.json:
            record = {"text": text, **prediction._asdict()}
            if prediction.spam_probability is not None:
                record["spam_probability"] = prediction.spam_probability
            print(json.dumps(record))
        else:
            print(f"{prediction.label}\t{prediction.probability:.4f}")


def cmd_evaluate(args: argparse.Namespace) -> None:
    from spam_gpt.evaluation import evaluate_predictor
    from spam_gpt.labelled import labelled_inputs, load_every_row, load_in_process, skipped_line
    from spam_gpt.model_ref import load_predictor

    if args.every_row and not args.data:
        raise ValueError("--every-row scores the rows of --data: give --data")
    if args.every_row and (args.split_column or args.test_data):
        raise ValueError("--every-row uses every row: drop --split-column and --test-data")
    predictor = load_predictor(args.model, args.tracking_uri, precision=args.precision)
    inputs = labelled_inputs(data_spec_from_args(args))._replace(
        fixed_labels=list(predictor.meta.labels)
    )
    if not args.every_row:
        plan, frames = load_in_process(inputs, labels_origin="the model's labels")
        report_data(plan)
        print_summary(evaluate_predictor(predictor, frames))
        return
    rows, stats = load_every_row(inputs, list(predictor.meta.labels))
    print(f"Data: {len(rows):,} rows, evaluated as one set")
    if skipped := skipped_line(stats.skipped, stats.rows, stats.skipped_examples):
        print(skipped)
    metrics = evaluate_predictor(predictor, {"test": rows})
    print(f"Accuracy: {metrics['test_accuracy']:.2%}")
    print_scores(metrics, "support")


def cmd_generate(args: argparse.Namespace) -> None:
    import torch

    from spam_gpt.model import generate_text_simple
    from spam_gpt.tokenizer import encode_text, get_tokenizer
    from spam_gpt.weights import load_pretrained_gpt

    model, _ = load_pretrained_gpt(args.weights)
    prompt = torch.tensor([encode_text(args.prompt)])
    out = generate_text_simple(model, prompt, args.max_new_tokens, model.cfg.context_length)
    print(get_tokenizer().decode(out[0].tolist()))


def cmd_score(args: argparse.Namespace) -> None:
    from spam_gpt.scoring import run_scoring
    from spam_gpt.tracking import absolute_tracking_uri

    require_cpu_for_int8(args.precision, "cuda" if args.gpu else "cpu")
    summary = run_scoring(
        args.model,
        args.input,
        args.output,
        text_column=args.text_column,
        batch_size=args.batch_size,
        concurrency=args.concurrency,
        cpus_per_actor=args.cpus_per_actor,
        gpu=args.gpu,
        address=args.address,
        runtime_env=args.runtime_env,
        tracking_uri=absolute_tracking_uri(args.tracking_uri),
        overwrite=args.overwrite,
        resume=args.resume,
        precision=args.precision,
    )
    print(summary)


def cmd_serve(args: argparse.Namespace) -> None:
    from spam_gpt.api_keys import read_api_keys
    from spam_gpt.gates import check_origins
    from spam_gpt.model_ref import alias_of, pin_model_ref
    from spam_gpt.server import require_free_port, serve_forever, use_high_throughput_ingress
    from spam_gpt.tracking import absolute_tracking_uri

    if args.detach and not (args.address or os.environ.get("RAY_ADDRESS")):
        raise ValueError(
            "--detach leaves the endpoint running on a cluster; give --address (a local Ray "
            "ends with this command)"
        )
    require_cpu_for_int8(args.precision, "cuda" if args.gpu else "cpu")
    if args.high_throughput:
        use_high_throughput_ingress(args.address)
    tracking_uri = absolute_tracking_uri(args.tracking_uri)
    follow = alias_of(args.model) is not None and args.reload_interval_s > 0
    key_file = str(Path(args.api_key_file).expanduser().resolve()) if args.api_key_file else None
    if not (args.address or os.environ.get("RAY_ADDRESS")):
        read_api_keys(key_file)  # a bad key file stops here, not in a replica
        require_free_port(args.host, args.port)  # not in Serve's proxy, as a traceback
    check_origins(args.allow_origin or [])
    pinned = pin_model_ref(args.model, tracking_uri)  # also checks that the model exists
    app_args = {
        "model": args.model if follow else pinned,  # an alias followed stays an alias
        "tracking_uri": tracking_uri,
        "precision": args.precision,
        "max_batch_size": 1 if args.no_batching else args.max_batch_size,
        "api_key_file": key_file,
        "reload_interval_s": args.reload_interval_s,
        "threads": args.threads,
        "gpu": args.gpu,
        "replicas": args.replicas,
        "min_replicas": args.min_replicas,
        "max_replicas": args.max_replicas,
        "allow_origins": args.allow_origin,
    }
    serve_forever(
        app_args,
        args.host,
        args.port,
        args.address,
        args.runtime_env,
        args.detach,
        metrics_port=args.metrics_port,
    )


COMMANDS = {
    "prepare": cmd_prepare,
    "train": cmd_train,
    "classify": cmd_classify,
    "evaluate": cmd_evaluate,
    "generate": cmd_generate,
    "score": cmd_score,
    "serve": cmd_serve,
    "sweep": cmd_sweep,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not hasattr(args, "verbose"):  # commands that start no Ray
        return run_command(args)
    with console.quieted(console.default_log_file(args.command), args.verbose):
        try:
            return run_command(args)
        finally:
            if logs := console.where_logs_are():
                print(logs)


def run_command(args: argparse.Namespace) -> int:
    try:
        return COMMANDS[args.command](args) or 0
    except (ValueError, FileNotFoundError) as error:  # our errors say what to do
        print(f"spam-gpt {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as stop:  # Ctrl-C or SIGTERM: what was saved is said there
        print(f"spam-gpt {args.command}: stopped", file=sys.stderr)
        return 128 + (signal.SIGTERM if isinstance(stop, Terminated) else signal.SIGINT)
    except BrokenPipeError:  # `spam-gpt classify … | head`: the reader has all it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no error at exit
        return 128 + signal.SIGPIPE


def command_parsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    raise AssertionError("spam-gpt's parser has no commands")


def job_main(command: str, argv: Sequence[str]) -> int:
    """Entry point of ``jobs/<command>.py``: defaults from ``ray_config.yaml`` (or
    ``--config PATH``), then the job's own arguments, which win."""
    from spam_gpt.settings import SettingsError, load_settings, settings_arguments, settings_path

    argv = list(argv)
    explicit = None
    if "--config" in argv:
        at = argv.index("--config")
        explicit = argv[at + 1] if at + 1 < len(argv) else ""
        del argv[at : at + 2]
    try:
        path = settings_path(explicit)
        defaults = []
        if path is not None:
            parsers = command_parsers(build_parser())
            defaults = settings_arguments(command, load_settings(path), parsers, str(path))
    except SettingsError as error:
        print(f"spam-gpt {command}: error: {error}", file=sys.stderr)
        return 2
    return main([command, *defaults, *argv])


if __name__ == "__main__":
    sys.exit(main())
