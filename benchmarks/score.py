"""Scoring throughput: the Ray Data job against the chapter's loop, transformers and ONNX Runtime.

    python benchmarks/score.py [--rows 100000] [--models tiny gpt2-small]

For each model (random weights: speed does not depend on training) it writes the corpus
replicated to ``--rows`` rows of Parquet and measures rows per second of
  (a) ``spam-gpt score`` (Ray Data; by default one single-thread actor per core, which on
      two cores scored 20-30 % more rows/s than one actor with both), in fp32, bf16, int8;
  (b) the chapter's ``classify_review`` loop: each message padded to 120, one at a time;
  (c) transformers' ``GPT2ForSequenceClassification`` with the same weights, batches of
      64 in input order padded to their longest message;
  (d), (e) that model exported to ONNX and run by ONNX Runtime, fp32 and with its dynamic
      int8 quantisation, batches of 64 sorted by length, the median of three passes
      after a warm-up (needs the ``bench`` extra).
(b) to (e) run on ``--sample`` messages of the same file; (a) on ``--job-rows`` of it.
Prints a Markdown table with the ratios (a)/(b), (a)/(c) and (a) int8/(e), and for each
job the peak private memory of the driver and of the largest model actor.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from spam_gpt.checkpoint import ClassifierMeta, load_classifier, save_classifier
from spam_gpt.classifier import SpamClassifier
from spam_gpt.corpus import bundled_corpus_bytes, parse_collection
from spam_gpt.memory import PeakMemory
from spam_gpt.model import MODEL_CONFIGS, GPTModel, init_gpt2_weights
from spam_gpt.scoring import UnitScorer, run_scoring
from spam_gpt.tokenizer import PAD_TOKEN_ID, encode_text

THREADS = os.cpu_count() or 1
PRECISIONS = ("fp32", "bf16", "int8")


def write_corpus(path: Path, rows: int) -> list[str]:
    """The corpus replicated to ``rows`` rows, written a chunk at a time (ten million
    Python strings would be most of this machine's memory); returns the corpus."""
    texts = parse_collection(bundled_corpus_bytes())["Text"].tolist()
    chunk = len(texts) * (100_000 // len(texts))
    schema = pa.schema([("id", pa.int64()), ("text", pa.string())])
    with pq.ParquetWriter(path, schema) as writer:
        for start in range(0, rows, chunk):
            count = min(chunk, rows - start)
            replicated = (texts * (chunk // len(texts)))[:count]
            table = pa.table({"id": range(start, start + count), "text": replicated})
            writer.write_table(table.cast(schema), row_group_size=10_000)
    return texts


def scorer_pids() -> list[int]:
    """The scoring job's model actors (Ray names their processes after the class)."""
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if UnitScorer.__name__.encode() in cmdline.read_bytes():
                pids.append(int(cmdline.parent.name))
        except OSError:
            continue
    return pids


def random_checkpoint(name: str, folder: Path) -> Path:
    torch.manual_seed(0)
    gpt = GPTModel(MODEL_CONFIGS[name])
    init_gpt2_weights(gpt)
    classifier = SpamClassifier(gpt, token="last_real")
    meta = ClassifierMeta(MODEL_CONFIGS[name].to_dict(), "last_real", "batch", max_length=120)
    return save_classifier(classifier, meta, folder / name)


def chapter_loop(checkpoint: Path, texts: list[str]) -> float:
    """The chapter's ``classify_review``: pad to 120, one message per forward pass."""
    classifier, _ = load_classifier(checkpoint)
    started = time.perf_counter()
    with torch.no_grad():
        for text in texts:
            ids = encode_text(text)[:120]
            batch = torch.tensor([ids + [PAD_TOKEN_ID] * (120 - len(ids))])
            classifier.gpt(batch)[:, -1, :].argmax(dim=-1).item()
    return len(texts) / (time.perf_counter() - started)


def transformers_model(checkpoint: Path):
    """GPT2ForSequenceClassification holding the checkpoint's weights (its head has no
    bias; ours does, which changes nothing about speed)."""
    from transformers import GPT2Config, GPT2ForSequenceClassification

    classifier, meta = load_classifier(checkpoint)
    cfg = meta.model_config
    model = GPT2ForSequenceClassification(
        GPT2Config(
            n_embd=cfg["emb_dim"],
            n_layer=cfg["n_layers"],
            n_head=cfg["n_heads"],
            n_positions=cfg["context_length"],
            num_labels=2,
            pad_token_id=PAD_TOKEN_ID,
        )
    ).eval()
    ours = classifier.gpt.state_dict()
    state = {
        "transformer.wte.weight": ours["tok_emb.weight"],
        "transformer.wpe.weight": ours["pos_emb.weight"],
        "transformer.ln_f.weight": ours["final_norm.weight"],
        "transformer.ln_f.bias": ours["final_norm.bias"],
        "score.weight": ours["out_head.weight"],
    }
    for i in range(cfg["n_layers"]):
        b, h = f"trf_blocks.{i}.", f"transformer.h.{i}."
        qkv = ("W_query", "W_key", "W_value")
        state[h + "attn.c_attn.weight"] = torch.cat([ours[b + f"att.{n}.weight"] for n in qkv]).T
        state[h + "attn.c_attn.bias"] = torch.cat([ours[b + f"att.{n}.bias"] for n in qkv])
        for theirs, mine, transpose in (
            ("attn.c_proj", "att.out_proj", True),
            ("mlp.c_fc", "ff.layers.0", True),
            ("mlp.c_proj", "ff.layers.2", True),
            ("ln_1", "norm1", False),
            ("ln_2", "norm2", False),
        ):
            weight = ours[b + mine + ".weight"]
            state[h + theirs + ".weight"] = weight.T if transpose else weight
            state[h + theirs + ".bias"] = ours[b + mine + ".bias"]
    model.load_state_dict({k: v.contiguous() for k, v in state.items()}, strict=False)
    return model


def padded(ids: list[list[int]]) -> tuple[list[list[int]], list[list[int]]]:
    """Token ids padded to the longest in the batch, and their attention mask."""
    width = max(map(len, ids))
    return (
        [i + [PAD_TOKEN_ID] * (width - len(i)) for i in ids],
        [[1] * len(i) + [0] * (width - len(i)) for i in ids],
    )


def transformers_batched(checkpoint: Path, texts: list[str], batch_size: int = 64) -> float:
    model = transformers_model(checkpoint)
    started = time.perf_counter()
    with torch.no_grad():
        for start in range(0, len(texts), batch_size):
            ids, mask = padded([encode_text(t)[:120] for t in texts[start : start + batch_size]])
            model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.argmax(-1)
    return len(texts) / (time.perf_counter() - started)


def onnx_models(checkpoint: Path, folder: Path) -> dict[str, Path]:
    """The transformers model exported to ONNX (fp32), and that file quantised by ONNX
    Runtime's dynamic int8 quantisation (int8 weights, activations per batch)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    model = transformers_model(checkpoint)
    model.config.use_cache = False
    fp32, int8 = folder / f"{checkpoint.name}.onnx", folder / f"{checkpoint.name}-int8.onnx"
    example = torch.ones(2, 8, dtype=torch.long)
    torch.onnx.export(
        model,
        (example,),
        fp32,
        kwargs={"attention_mask": example},
        input_names=["input_ids", "attention_mask"],
        output_names=["logits"],
        dynamic_axes={name: {0: "batch", 1: "tokens"} for name in ("input_ids", "attention_mask")},
        dynamo=False,
    )
    quantize_dynamic(fp32, int8, weight_type=QuantType.QInt8)
    return {"fp32": fp32, "int8": int8}


def onnx_runtime_batched(
    model: Path, texts: list[str], batch_size: int = 64, threads: int | None = None, rounds: int = 3
) -> tuple[float, list[list[float]]]:
    """ONNX Runtime on the CPU with every core (or ``threads``), batches of messages sorted
    by length: messages per second, the median of ``rounds`` timed passes after a warm-up
    batch (one pass of 600 messages, about 5 s, read 91-121 messages/s within an hour on
    one VM), and each message's label probabilities in input order."""
    import statistics

    import numpy as np
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads or THREADS, 1
    session = onnxruntime.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
    probabilities: list[list[float]] = [[]] * len(texts)

    def classify(chunk: list[str]) -> None:
        encoded = [encode_text(t)[:120] for t in chunk]
        order = sorted(range(len(chunk)), key=lambda i: len(encoded[i]))
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            ids, mask = padded([encoded[i] for i in batch])
            feeds = {"input_ids": np.array(ids), "attention_mask": np.array(mask)}
            logits = torch.from_numpy(session.run(["logits"], feeds)[0])
            for i, row in zip(batch, torch.softmax(logits.float(), -1).tolist()):
                probabilities[i] = row

    classify(texts[:batch_size])  # warm-up: the session's first run sets up its kernels
    rates = []
    for _ in range(rounds):
        started = time.perf_counter()
        classify(texts)
        rates.append(len(texts) / (time.perf_counter() - started))
    return statistics.median(rates), probabilities


def onnx_runtime_runs(
    checkpoint: Path, texts: list[str], work: Path, threads: int | None = None
) -> dict[str, tuple[float, list[list[float]]]]:
    """(d) and (e): :func:`onnx_runtime_batched` on the fp32 and int8 exports of
    ``checkpoint``, by precision; empty without onnxruntime (the ``bench`` extra)."""
    if importlib.util.find_spec("onnxruntime") is None:
        return {}
    exported = onnx_models(checkpoint, work)
    return {p: onnx_runtime_batched(path, texts, threads=threads) for p, path in exported.items()}


def scoring_job(
    checkpoint: Path, parquet: Path, out: Path, precision: str, actors: int, threads: int
) -> float:
    """Rows per second of ``actors`` actors of ``threads`` threads each; prints the peak
    private memory of the driver and of the largest actor."""
    driver, actor = PeakMemory(1.0), PeakMemory(1.0, scorer_pids)
    summary = run_scoring(
        str(checkpoint),
        [str(parquet)],
        str(out),
        concurrency=actors,
        cpus_per_actor=threads,
        precision=precision,
        overwrite=True,
    )
    print(
        f"  {checkpoint.name} {precision}: {summary.rows:,} rows, "
        f"{summary.rows / summary.seconds:,.1f} rows/s; peak private memory: driver "
        f"{driver.stop():,.0f} MiB, largest actor {actor.stop():,.0f} MiB",
        flush=True,
    )
    shutil.rmtree(out)
    return summary.rows / summary.seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=100_000, help="rows in the Parquet file")
    parser.add_argument("--job-rows", type=int, nargs="*", help="rows the job scores, per model")
    parser.add_argument("--sample", type=int, nargs="*", help="messages for (b) and (c), per model")
    parser.add_argument("--models", nargs="+", default=["tiny", "gpt2-small"])
    parser.add_argument(
        "--precisions", nargs="+", choices=PRECISIONS, default=PRECISIONS, help="jobs to run"
    )
    parser.add_argument(
        "--actors",
        type=int,
        default=THREADS,
        help="model actors of the job, sharing the cores (default: one per core; 1: one actor "
        "with every core)",
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="spam-gpt-bench-") as work:
        measure(args, Path(work))


def measure(args: argparse.Namespace, work: Path) -> None:
    """Every table row; ``work`` holds the data, checkpoints and outputs, removed at the end."""
    threads_per_actor = max(1, THREADS // args.actors)
    torch.set_num_threads(THREADS)
    job_rows = args.job_rows or [args.rows] * len(args.models)
    samples = args.sample or [2000] * len(args.models)
    texts = write_corpus(work / "messages.parquet", args.rows)
    print(
        f"{platform.processor() or platform.machine()}, {THREADS} CPUs, torch {torch.__version__}, "
        f"{args.rows:,} rows in {work / 'messages.parquet'}; the job: {args.actors} actor(s) of "
        f"{threads_per_actor} thread(s)"
    )
    if importlib.util.find_spec("onnxruntime") is None:
        print("(d), (e): ONNX Runtime is not installed (pip install -e '.[bench]')")
    print(
        "| model | (a) job fp32 | (a) job bf16 | (a) job int8 | (b) chapter loop | "
        "(c) transformers | (d) ORT fp32 | (e) ORT int8 | (a)/(b) fp32, bf16, int8 | "
        "(a)/(c) fp32, bf16, int8 | (a) int8/(e) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, rows, sample in zip(args.models, job_rows, samples):
        checkpoint = random_checkpoint(name, work)
        parquet = work / "messages.parquet"
        if rows < args.rows:
            parquet = work / f"messages-{rows}.parquet"
            pq.write_table(pq.read_table(work / "messages.parquet").slice(0, rows), parquet)
        job = {
            p: scoring_job(
                checkpoint, parquet, work / f"out-{name}-{p}", p, args.actors, threads_per_actor
            )
            for p in args.precisions
        }
        loop = chapter_loop(checkpoint, texts[:sample])
        hf = transformers_batched(checkpoint, texts[:sample])
        runs = onnx_runtime_runs(checkpoint, texts[:sample], work)
        ort = {p: rate for p, (rate, _) in runs.items()}
        rates = " | ".join(shown(job.get(p), "{:.1f}") for p in PRECISIONS)
        over_loop = ", ".join(shown(job.get(p), "{:.1f}x", loop) for p in PRECISIONS)
        over_hf = ", ".join(shown(job.get(p), "{:.1f}x", hf) for p in PRECISIONS)
        print(
            f"| {name} | {rates} | {loop:.1f} | {hf:.1f} | {shown(ort.get('fp32'), '{:.1f}')} | "
            f"{shown(ort.get('int8'), '{:.1f}')} | {over_loop} | {over_hf} | "
            f"{shown(job.get('int8'), '{:.2f}x', ort.get('int8'))} |",
            flush=True,
        )


def shown(value: float | None, form: str, over: float | None = 1.0) -> str:
    """``value`` (divided by ``over``) in ``form``, or a dash for what was not measured."""
    return "–" if value is None or over is None else form.format(value / over)


if __name__ == "__main__":
    main()
