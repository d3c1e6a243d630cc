"""Where bf16 and int8 run: autocast for training; bf16 weights or int8 Linear layers for
inference.

bf16 matrix units (AMX, AVX512-BF16 on CPUs; every recent GPU) run bf16 several times
faster than fp32. Training keeps fp32 weights and autocasts the forward pass; inference
simply holds bf16 weights. On a CPU without those units bf16 is slower, so fp32 stays
the CPU default. int8 is for CPUs: the transformer's Linear layers dynamically quantised
(int8 weights, activations quantised per pass).
"""

from __future__ import annotations

import contextlib
import warnings

import torch
from torch import nn

TRAINING_PRECISIONS = ("auto", "fp32", "bf16")  # auto: bf16 on GPUs, fp32 on CPUs
WEIGHT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "int8": torch.float32}
INFERENCE_PRECISIONS = tuple(WEIGHT_DTYPES)
# What torch.ao's dynamic quantisation warns of as it quantises the weights.
DEPRECATED_QUANTIZATION = r"torch\.(ao\.quantization is|quantize_per_tensor, )"


def require_cpu_for_int8(precision: str, device_type: str) -> None:
    """int8 kernels exist on CPUs only: say so before any work, not in a replica."""
    if precision == "int8" and device_type != "cpu":
        raise ValueError("--precision int8 runs on CPUs; on a GPU use bf16")


def quantize_int8(model: nn.Module) -> nn.Module:
    """``model`` with the Linear layers of its transformer blocks dynamically quantised to
    int8, weights per output channel; the classification head stays fp32.

    PyTorch's own dynamic quantisation (``torch.ao.quantization``), which is deprecated in
    favour of torchao: measured here on gpt2-small (two threads, 128 corpus messages) it
    ran 124 messages/s against torchao 0.18's 70 and fp32's 40, and torchao is not a
    dependency; see benchmarks/RESULTS.md. Its deprecation warnings are silenced here only.
    """
    from torch.ao.quantization import per_channel_dynamic_qconfig

    blocks = {
        name: per_channel_dynamic_qconfig
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and ".trf_blocks." in f".{name}"
    }
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=DEPRECATED_QUANTIZATION)
        return torch.ao.quantization.quantize_dynamic(model, blocks, dtype=torch.qint8)


def autocast_for(
    device: torch.device, precision: str = "auto"
) -> contextlib.AbstractContextManager:
    """bf16 autocast where asked, and on GPUs by default; fp32 on CPUs by default."""
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
