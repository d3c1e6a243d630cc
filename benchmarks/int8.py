"""int8 against fp32 in process: speed, and how far labels and probabilities move.

    python benchmarks/int8.py [--models gpt2-small] [--messages 256] [--threads 2]

For each model (random weights) it times ``Predictor.predict`` on random corpus messages in
fp32, in spam-gpt's int8 (``torch.ao`` dynamic quantisation of the blocks' Linear layers)
and, when torchao is installed, in torchao's ``Int8DynamicActivationInt8WeightConfig`` on
the same layers; each int8 row gives the share of labels equal to fp32's and the largest
change of a probability. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import platform
import random
import tempfile
import time
from pathlib import Path

import torch
from score import random_checkpoint

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["gpt2-small"])
    parser.add_argument("--messages", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    texts = parse_collection(bundled_corpus_bytes())["Text"].tolist()
    sample = random.Random(1).choices(texts, k=args.messages)
    work = Path(tempfile.mkdtemp(prefix="spam-gpt-int8-bench-"))
    print(f"{platform.machine()}, {args.threads} threads, torch {torch.__version__}")
    print("| model | precision | messages/s | x fp32 | labels as fp32 | largest change |")
    print("|---|---|---|---|---|---|")
    for name in args.models:
        checkpoint = random_checkpoint(name, work)
        variants = {
            "fp32": Predictor.from_checkpoint(str(checkpoint)),
            "int8 (torch.ao, spam-gpt)": Predictor.from_checkpoint(
                str(checkpoint), precision="int8"
            ),
            "int8 (torchao)": torchao_predictor(checkpoint),
        }
        reference, base = None, 0.0
        for label, predictor in variants.items():
            if predictor is None:
                continue
            predictor.predict(sample[:32])  # warm-up
            started = time.perf_counter()
            predictions = predictor.predict(sample)
            rate = len(sample) / (time.perf_counter() - started)
            reference, base = reference or predictions, base or rate
            same = sum(a.label == b.label for a, b in zip(reference, predictions)) / len(sample)
            change = max(
                abs(a.probabilities[k] - b.probabilities[k])
                for a, b in zip(reference, predictions)
                for k in a.probabilities
            )
            print(
                f"| {name} | {label} | {rate:.1f} | {rate / base:.2f}x | {same:.1%} | "
                f"{change:.3f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
