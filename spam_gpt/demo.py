"""``make demo``: the whole product on the embedded defaults, one stage a line.

prepare → train on 2 Ray Train workers (tracked in MLflow, registered) → score a Parquet
file made from the corpus with Ray Data → serve on Ray Serve and classify the chapter's
two examples over HTTP → say where everything is. Everything lands in ``demo-output/``.
"""

from __future__ import annotations

import argparse
import socket
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from spam_gpt import console

CHAPTER_EXAMPLES = (
    "You are a winner you have been specially selected to receive $1000 cash or a $2000 award.",
    "Hey, just wanted to check if we're still on for dinner tonight? Let me know!",
)


def stage(number: int, text: str) -> None:
    print(f"\n[{number}/5] {text}", flush=True)


def free_port(preferred: int) -> int:
    with socket.socket() as probe:
        if probe.connect_ex(("127.0.0.1", preferred)) != 0:
            return preferred
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def pretrained_weights_here() -> str | None:
    """gpt2-small weights already in this machine's Hugging Face cache (no network)."""
    from spam_gpt.weights import cached_weights

    cached = cached_weights("gpt2-small")
    return None if cached is None else str(cached)


def run_demo(out: Path, port: int) -> None:
    import ray
    from ray import serve

    from spam_gpt.cli import kept_epoch_note
    from spam_gpt.config import resolve_config
    from spam_gpt.corpus import build_splits, bundled_corpus_bytes, parse_collection, write_splits
    from spam_gpt.distributed import (
        connect_for_training,
        new_job,
        prepare_data,
        run_job,
        weights_for_workers,
    )
    from spam_gpt.model_ref import pin_model_ref
    from spam_gpt.scoring import run_scoring
    from spam_gpt.server import APP_NAME, classify_over_http, deploy

    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    tracking_uri = f"sqlite:///{(out / 'mlflow.db').resolve()}"

    stage(1, f"prepare: the chapter's splits in {out / 'data'}")
    splits = build_splits()
    write_splits(splits, out / "data")
    print(", ".join(f"{name} {len(frame)} rows" for name, frame in splits.items()))

    weights = pretrained_weights_here()
    if weights:
        cfg = resolve_config("fast", {"weights": weights, "epochs": 1})
        print(f"Found pretrained gpt2-small at {weights}: training the `fast` preset, 1 epoch.")
    else:
        cfg = resolve_config("tiny")
        print(
            "No pretrained GPT-2 weights on this machine (see README, 'Real GPT-2 weights'): "
            "training the `tiny` preset from scratch."
        )
    connect_for_training(None, workers=2, cpus_per_worker=1)
    stage(2, f"train: `{cfg.preset}` on 2 Ray Train workers, tracked in MLflow ({tracking_uri})")
    inputs, plan = prepare_data(None)
    job = new_job(
        cfg,
        plan,
        output=str(out / "train"),
        workers=2,
        cpus_per_worker=1,
        gpu=False,
        tracking_uri=tracking_uri,
        experiment="spam-gpt-demo",
        register_as="spam-gpt",
        max_failures=1,
        storage_path=None,
        data=None,
    )
    metrics = run_job(job, inputs, plan, weights_for_workers(cfg.weights))
    model_ref = pin_model_ref("models:/spam-gpt/latest", tracking_uri)
    if note := kept_epoch_note(metrics):
        print(note)
    print(
        f"Test accuracy {metrics['test_accuracy']:.2%}, spam precision "
        f"{metrics['spam_precision']:.2%}, recall {metrics['spam_recall']:.2%}; "
        f"registered as {model_ref}"
    )

    stage(3, "score: every message of the corpus, as Parquet, with Ray Data")
    corpus = parse_collection(bundled_corpus_bytes())
    archive = out / "messages.parquet"
    pq.write_table(
        pa.table(
            {
                "id": range(len(corpus)),
                "uci_label": corpus["Label"].tolist(),
                "text": corpus["Text"].tolist(),
            }
        ),
        archive,
    )
    summary = run_scoring(
        model_ref, [str(archive)], str(out / "scored"), tracking_uri=tracking_uri, overwrite=True
    )
    print(summary)

    stage(4, "serve: the endpoint on Ray Serve, asked over HTTP")
    url = deploy({"model": model_ref, "tracking_uri": tracking_uri}, "127.0.0.1", port, None)
    for text in CHAPTER_EXAMPLES:
        answer = classify_over_http(url, text)
        print(f"{answer['label']:>8}  ({answer['spam_probability']:.3f})  {text}")
    serve.delete(APP_NAME)
    print(f"Endpoint at {url} stopped.")

    stage(5, f"done in {time.perf_counter() - started:.0f} s; where everything is:")
    bin_dir = Path(sys.executable).parent
    print(f"  MLflow UI:     {bin_dir / 'mlflow'} ui --backend-store-uri {tracking_uri}")
    print(f"  Model:         {model_ref} (checkpoint: {out / 'train' / 'model'})")
    print(f"  Plots:         {out / 'train'} (loss, accuracy, confusion matrix; PNG and PDF)")
    print(f"  Scored output: {out / 'scored'}")
    print(
        f"  Serve again:   {bin_dir / 'spam-gpt'} serve --model {model_ref} "
        f"--tracking-uri {tracking_uri}"
    )
    if logs := console.where_logs_are():
        print(f"  {logs}")
    ray.shutdown()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="demo-output", help="where everything lands")
    parser.add_argument("--port", type=int, default=8000, help="endpoint port (default 8000)")
    parser.add_argument(
        "--verbose", action="store_true", help="show Ray's and MLflow's logs here too"
    )
    args = parser.parse_args(argv)
    out = Path(args.out).resolve()
    with console.quieted(out / "logs" / "spam-gpt.log", args.verbose):
        run_demo(out, free_port(args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
