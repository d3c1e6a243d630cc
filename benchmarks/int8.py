"""int8 against fp32 in process: speed, and how far labels and probabilities move.

    python benchmarks/int8.py [--models gpt2-small] [--messages 256] [--threads 2]

For each model (random weights) it times ``Predictor.predict`` on random corpus messages in
fp32, in spam-gpt's int8 (the blocks' Linear layers; see ``spam_gpt.precision``), eager
and with its rounding compiled as scoring actors and Serve replicas run it, and, when
torchao is installed, in torchao's ``Int8DynamicActivationInt8WeightConfig`` on the same
layers; with onnxruntime installed (``pip install -e '.[bench]'``), ONNX Runtime fp32 and
its dynamic int8 on transformers' model with the same weights, timed with tokenization as
the predictor is. Each int8 row gives the share of labels equal to its own fp32's and the
largest change of a probability. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import platform
import random
import tempfile
import time
from pathlib import Path

import torch
from score import onnx_runtime_runs, random_checkpoint

from spam_gpt.corpus import bundled_corpus_bytes, parse_collection
from spam_gpt.predictor import Predictor


def torchao_predictor(checkpoint: Path) -> Predictor | None:
    try:
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_
    except ImportError:
        return None
    predictor = Predictor.from_checkpoint(str(checkpoint))
    blocks = predictor.classifier.gpt.trf_blocks
    quantize_(blocks, Int8DynamicActivationInt8WeightConfig())
    return predictor


def timed(predictor: Predictor, sample: list[str]) -> tuple[float, list[list[float]]]:
    """Messages per second, and every message's label probabilities."""
    predictor.predict(sample[:32])  # warm-up
    started = time.perf_counter()
    predictions = predictor.predict(sample)
    rate = len(sample) / (time.perf_counter() - started)
    return rate, [list(p.probabilities.values()) for p in predictions]


def agreement(reference: list[list[float]], rows: list[list[float]]) -> tuple[float, float]:
    """Share of labels (argmax) equal to the reference's, and the largest probability change."""
    same = sum(a.index(max(a)) == b.index(max(b)) for a, b in zip(reference, rows))
    change = max(abs(x - y) for a, b in zip(reference, rows) for x, y in zip(a, b))
    return same / len(rows), change


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["gpt2-small"])
    parser.add_argument("--messages", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="spam-gpt-int8-bench-") as work:
        measure(args, Path(work))


def measure(args: argparse.Namespace, work: Path) -> None:
    """Every table row; ``work`` holds the checkpoints and exports, removed at the end."""
    torch.set_num_threads(args.threads)
    texts = parse_collection(bundled_corpus_bytes())["Text"].tolist()
    sample = random.Random(1).choices(texts, k=args.messages)
    print(f"{platform.machine()}, {args.threads} threads, torch {torch.__version__}")
    print("| model | precision | messages/s | x fp32 | labels as its fp32 | largest change |")
    print("|---|---|---|---|---|---|")
    for name in args.models:
        checkpoint = random_checkpoint(name, work)
        predictors = {
            "fp32": Predictor.from_checkpoint(str(checkpoint)),
            "int8 (spam-gpt)": Predictor.from_checkpoint(str(checkpoint), precision="int8"),
            "int8 (spam-gpt, compiled)": Predictor.from_checkpoint(
                str(checkpoint), precision="int8", compile_int8=True
            ),
            "int8 (torchao)": torchao_predictor(checkpoint),
        }
        results = {label: timed(p, sample) for label, p in predictors.items() if p is not None}
        # ONNX Runtime's head has no bias, so its probabilities are its own: its int8 is
        # compared with its fp32.
        ort = onnx_runtime_runs(checkpoint, sample, work, args.threads)
        results |= {f"ORT {p}": run for p, run in ort.items()}
        base = results["fp32"][0]
        for label, (rate, rows) in results.items():
            reference = results["ORT fp32" if label.startswith("ORT") else "fp32"][1]
            same, change = agreement(reference, rows)
            print(
                f"| {name} | {label} | {rate:.1f} | {rate / base:.2f}x | {same:.1%} | "
                f"{change:.3f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
