"""AdamW's step as spam-gpt takes it (PyTorch's fused kernel) against PyTorch's default on
a CPU (one tensor at a time, a dozen passes over memory), and what that does to the
``tiny`` preset's training time and accuracy.

    python benchmarks/optimizer.py [--threads 1] [--seeds 123 1]

Part one times one optimizer step on random gradients for each recipe's trainable
parameters (random weights: speed does not depend on them). Part two trains the ``tiny``
preset in process with each optimizer, seed by seed. Prints Markdown tables.
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

import spam_gpt.finetune as finetune_module
from spam_gpt.classifier import SpamClassifier, count_parameters, set_trainable_layers
from spam_gpt.config import resolve_config
from spam_gpt.corpus import build_splits
from spam_gpt.model import GPTModel, model_config

RECIPES = {  # name: (model, trainable)
    "tiny (all layers)": ("tiny", "all"),
    "gpt2-small, last block (chapter)": ("gpt2-small", "last_block"),
    "gpt2-small, all layers": ("gpt2-small", "all"),
}
DEFAULT, FUSED = "one tensor at a time (CPU default)", "fused (spam-gpt)"
OPTIMIZERS = {DEFAULT: {"foreach": False}, "foreach": {"foreach": True}, FUSED: {"fused": True}}


def step_ms(parameters: list[torch.nn.Parameter], options: dict, steps: int) -> float:
    optimizer = torch.optim.AdamW(parameters, lr=1e-3, weight_decay=0.1, **options)
    for parameter in parameters:
        parameter.grad = torch.randn_like(parameter)
    for _ in range(2):  # the state's first allocation is not a step's cost
        optimizer.step()
    started = time.perf_counter()
    for _ in range(steps):
        optimizer.step()
    return (time.perf_counter() - started) / steps * 1000


def steps_table(steps: int) -> None:
    columns = " | ".join(f"{kind}, ms" for kind in OPTIMIZERS)
    print(f"| trainable | parameters | {columns} | fused x |")
    print("|---|---|" + "---|" * (len(OPTIMIZERS) + 1))
    for name, (model, trainable) in RECIPES.items():
        torch.manual_seed(0)
        classifier = SpamClassifier(GPTModel(model_config(model)))
        set_trainable_layers(classifier, trainable)
        parameters = [p for p in classifier.parameters() if p.requires_grad]
        times = {kind: step_ms(parameters, options, steps) for kind, options in OPTIMIZERS.items()}
        print(
            f"| {name} | {count_parameters(classifier, trainable_only=True):,} | "
            + " | ".join(f"{ms:.1f}" for ms in times.values())
            + f" | {times[DEFAULT] / times[FUSED]:.2f}x |"
        )


def tiny_runs(seeds: list[int]) -> None:
    splits = build_splits()
    print("\n| optimizer | seed | training seconds | test accuracy |")
    print("|---|---|---|---|")
    for seed in seeds:
        for name, devices in (("PyTorch's default", ()), (FUSED, ("cpu",))):
            finetune_module.FUSED_ADAMW_DEVICES = devices
            result = finetune_module.finetune(
                resolve_config("tiny", {"seed": seed}), splits, verbose=False
            )
            metrics = result.metrics
            print(
                f"| {name} | {seed} | {metrics['training_seconds']:.1f} | "
                f"{metrics['test_accuracy']:.2%} |"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per cell")
    parser.add_argument("--seeds", type=int, nargs="*", default=[123, 1])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(
        f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{args.threads} thread(s)\n"
    )
    steps_table(args.steps)
    tiny_runs(args.seeds)


if __name__ == "__main__":
    main()
