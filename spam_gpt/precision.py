"""Where bf16 runs: autocast for training, bf16 weights for inference.

bf16 matrix units (AMX, AVX512-BF16 on CPUs; every recent GPU) run bf16 several times
faster than fp32. Training keeps fp32 weights and autocasts the forward pass; inference
simply holds bf16 weights. On a CPU without those units bf16 is slower, so fp32 stays
the CPU default.
"""

from __future__ import annotations

import contextlib

import torch

TRAINING_PRECISIONS = ("auto", "fp32", "bf16")  # auto: bf16 on GPUs, fp32 on CPUs
WEIGHT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def autocast_for(
    device: torch.device, precision: str = "auto"
) -> contextlib.AbstractContextManager:
    """bf16 autocast where asked, and on GPUs by default; fp32 on CPUs by default."""
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
