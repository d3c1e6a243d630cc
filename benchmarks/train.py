"""Training benchmarks: seconds per epoch of the recipes, in-process against streamed Ray
Train, and memory against data size.

    python benchmarks/train.py [--sections epochs throughput startup memory]
        [--rows 200000 2000000] [--rounds 3]

epochs: gpt2-small with random weights (speed does not depend on them), one epoch on the
    chapter's data, in process: ``chapter`` (padded to 120, last token), ``fast`` padded
    per batch (``--packing off``, as before packing), ``fast`` packed, and packed with
    ``--precision bf16``; then the ``tiny`` preset's 5 epochs padded per batch and packed.

throughput: the ``tiny`` preset on the chapter's data, 5 epochs, training examples per
    second (examples seen / training-loop seconds) of ``spam-gpt train`` in process, and
    with rows streamed through Ray Data to one Ray Train worker (both cores) and to two
    (DistributedDataParallel, a core each).
startup: a one-step job on two Ray Train workers, from the command to its last line (nearly
    all of it Ray's start-up and end), ``--rounds`` times each, alternating Ray Train's
    default controller poll (every 2 s) with spam-gpt's (every 0.5 s).
memory: a labelled Parquet set of the corpus repeated to each ``--rows`` (files of
    100,000 rows), ``--workers 2 --max-steps 300``; the peak resident memory of the driver
    and of each Ray Train worker, which must not grow with the data.

Each run is a fresh ``spam-gpt`` process with its own local Ray. Prints Markdown tables.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from spam_gpt.corpus import bundled_corpus_bytes, parse_collection
from spam_gpt.distributed import CONTROLLER_POLL

FILE_ROWS = 100_000


def run_train(
    out: Path, *args: str, preset: str = "tiny", env: dict[str, str] | None = None
) -> tuple[dict, float]:
    """``spam-gpt train`` in a child process (with ``env``, else this one's) that reports
    its own peak memory."""
    code = (
        "import sys\n"
        "from spam_gpt.cli import main\n"
        "from spam_gpt.memory import PeakMemory, peak_rss_mb\n"
        "memory = PeakMemory()\n"
        "code = main(sys.argv[1:])\n"
        "print('PEAK_MB', memory.stop(), peak_rss_mb())\n"
        "sys.exit(code)\n"
    )
    uri = f"sqlite:///{out.parent / 'mlflow.db'}"
    command = [sys.executable, "-c", code, "train", "--preset", preset, "--output", str(out)]
    if "--workers" in args:
        command += ["--tracking-uri", uri, "--register-as", ""]
    started = time.perf_counter()
    done = subprocess.run([*command, *args], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"training failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    marker = next(line for line in done.stdout.splitlines() if line.startswith("PEAK_MB"))
    private, rss = map(float, marker.split()[1:])
    metrics = json.loads((out / "metrics.json").read_text())
    return metrics | {"driver_peak_private_mb": private, "driver_peak_rss_mb": rss}, wall


EPOCH_RUNS = {
    "chapter": ("chapter", ()),
    "fast, padded per batch (before)": ("fast", ("--packing", "off")),
    "fast, packed": ("fast", ()),
    "fast, packed, bf16": ("fast", ("--precision", "bf16")),
}


def epochs(folder: Path) -> None:
    print("| gpt2-small, 1 epoch | seconds | vs chapter | test accuracy |")
    print("|---|---|---|---|")
    seconds = {}
    for k, (name, (preset, args)) in enumerate(EPOCH_RUNS.items()):
        extra = ("--weights", "random", "--model", "gpt2-small", "--epochs", "1", *args)
        metrics, _ = run_train(folder / f"epoch-{k}", *extra, preset=preset)
        seconds[name] = metrics["training_seconds"]
        print(
            f"| {name} | {seconds[name]:.1f} | {seconds['chapter'] / seconds[name]:.2f}x | "
            f"{metrics['test_accuracy']:.2%} |"
        )
    print("\n| tiny preset, 5 epochs | training seconds | test accuracy |")
    print("|---|---|---|")
    for k, (name, args) in enumerate(
        (("padded per batch (before)", ("--packing", "off")), ("packed", ()))
    ):
        metrics, _ = run_train(folder / f"tiny-{k}", *args)
        print(f"| {name} | {metrics['training_seconds']:.1f} | {metrics['test_accuracy']:.2%} |")
    print()


def throughput(folder: Path) -> None:
    print("| run | examples seen | training s | examples/s | test accuracy | wall s |")
    print("|---|---|---|---|---|---|")
    rates = {}
    runs = {
        "in-process": (),
        "1 Ray worker, streamed": ("--workers", "1", "--cpus-per-worker", "2"),
        "2 Ray workers, streamed": ("--workers", "2"),
    }
    for name, args in runs.items():
        metrics, wall = run_train(folder / name.split(",")[0].replace(" ", "-"), *args)
        seen = metrics["history"]["examples_seen"]
        rates[name] = seen / metrics["training_seconds"]
        print(
            f"| {name} | {seen:,} | {metrics['training_seconds']:.1f} | {rates[name]:,.0f} | "
            f"{metrics['test_accuracy']:.2%} | {wall:.0f} |"
        )
    base = rates["in-process"]
    print(", ".join(f"{name} / in-process: {rate / base:.2f}x" for name, rate in rates.items()))


ONE_STEP = ("--workers", "2", "--epochs", "1", "--max-steps", "1")


def startup(folder: Path, rounds: int) -> None:
    poll, interval = CONTROLLER_POLL
    own = {name: value for name, value in os.environ.items() if name != poll}
    polls = {
        "every 2 s (Ray Train's default)": own | {poll: "2"},
        f"every {interval} s (spam-gpt's)": own,
    }
    print("| round | " + " | ".join(f"wall s, poll {name}" for name in polls) + " |")
    print("|---|" + "---|" * len(polls))
    walls: dict[str, list[float]] = {name: [] for name in polls}
    for round_ in range(1, rounds + 1):
        for k, (name, env) in enumerate(polls.items()):
            _, wall = run_train(folder / f"startup-{round_}-{k}", *ONE_STEP, env=env)
            walls[name].append(wall)
        print(f"| {round_} | " + " | ".join(f"{walls[name][-1]:.1f}" for name in polls) + " |")
    default, ours = (sum(w) / len(w) for w in walls.values())
    print(f"mean: {default:.1f} s against {ours:.1f} s ({ours / default:.2f}x)\n")


def write_labelled(folder: Path, rows: int) -> Path:
    """The corpus (ham/spam) repeated to ``rows`` rows, in files of 100,000."""
    corpus = parse_collection(bundled_corpus_bytes())
    texts, labels = corpus["Text"].tolist(), corpus["Label"].tolist()
    target = folder / f"labelled-{rows}"
    target.mkdir()
    for start in range(0, rows, FILE_ROWS):
        count = min(FILE_ROWS, rows - start)
        index = [(start + i) % len(texts) for i in range(count)]
        table = pa.table({"text": [texts[i] for i in index], "label": [labels[i] for i in index]})
        pq.write_table(table, target / f"part-{start // FILE_ROWS:04d}.parquet")
    return target


def memory(folder: Path, sizes: list[int], max_steps: int) -> None:
    print("| rows | driver private / RSS MiB | worker private MiB | worker RSS MiB | wall s |")
    print("|---|---|---|---|---|")
    peaks = {}
    for rows in sizes:
        data = write_labelled(folder, rows)
        args = ("--workers", "2", "--max-steps", str(max_steps), "--data", str(data))
        metrics, wall = run_train(folder / f"run-{rows}", *args)
        private, rss = metrics["worker_peak_private_mb"], metrics["worker_peak_rss_mb"]
        peaks[rows] = (metrics["driver_peak_private_mb"], max(private), max(rss))
        print(
            f"| {rows:,} | {metrics['driver_peak_private_mb']:,.0f} / "
            f"{metrics['driver_peak_rss_mb']:,.0f} | {' / '.join(f'{w:,.0f}' for w in private)} | "
            f"{' / '.join(f'{w:,.0f}' for w in rss)} | {wall:.0f} |"
        )
    small, large = peaks[min(sizes)], peaks[max(sizes)]
    print(
        f"\n{max(sizes):,} rows / {min(sizes):,} rows: driver private {large[0] / small[0]:.2f}x, "
        f"worker private {large[1] / small[1]:.2f}x, worker RSS {large[2] / small[2]:.2f}x"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--sections", nargs="+", default=["epochs", "throughput", "startup", "memory"]
    )
    parser.add_argument("--rows", nargs="+", type=int, default=[200_000, 2_000_000])
    parser.add_argument("--max-steps", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3, help="start-up runs of each kind")
    args = parser.parse_args()
    print(
        f"{time.strftime('%Y-%m-%d')}, {platform.machine()}, {platform.processor() or ''} "
        f"python {platform.python_version()}, benchmark process peak "
        f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB\n"
    )
    with tempfile.TemporaryDirectory() as tmp:
        if "epochs" in args.sections:
            epochs(Path(tmp))
        if "throughput" in args.sections:
            throughput(Path(tmp))
        if "startup" in args.sections:
            startup(Path(tmp), args.rounds)
        if "memory" in args.sections:
            memory(Path(tmp), sorted(args.rows), args.max_steps)


if __name__ == "__main__":
    main()
