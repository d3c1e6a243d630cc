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
import functools
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn
from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

TRAINING_PRECISIONS = ("auto", "fp32", "bf16")  # auto: bf16 on GPUs, fp32 on CPUs
WEIGHT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "int8": torch.float32}
INFERENCE_PRECISIONS = tuple(WEIGHT_DTYPES)
# What torch.ao's dynamic quantisation warns of as it quantises the weights.
DEPRECATED_QUANTIZATION = r"torch\.(ao\.quantization is|quantize_per_tensor, )"


def require_cpu_for_int8(precision: str, device_type: str) -> None:
    """int8 kernels exist on CPUs only: say so before any work, not in a replica."""
    if precision == "int8" and device_type != "cpu":
        raise ValueError("--precision int8 runs on CPUs; on a GPU use bf16")


@functools.cache
def adds_int8_into_32_bits() -> bool:
    """Whether this CPU has VNNI (AVX512-VNNI, AVX-VNNI or AMX-INT8), whose int8 dot
    products add straight into 32 bits; read from ``/proc/cpuinfo`` (False elsewhere)."""
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(flag in cpuinfo.split() for flag in ("avx512_vnni", "avx_vnni", "amx_int8"))


@contextlib.contextmanager
def quantized_engine(name: str) -> Iterator[None]:
    """torch's quantised engine set to ``name`` (when this build has it) while weights are
    packed: the packed weights keep that engine's kernels after the setting is restored."""
    before = torch.backends.quantized.engine
    if name in torch.backends.quantized.supported_engines:
        torch.backends.quantized.engine = name
    try:
        yield
    finally:
        torch.backends.quantized.engine = before


class FullRangeDynamicLinear(DynamicLinear):
    """torch.ao's dynamic int8 Linear with its activations quantised to all 8 bits.

    torch.ao asks for 7-bit activations (``reduce_range``) because fbgemm's AVX2 kernels
    add pairs of u8 x s8 products in 16 bits, which 8-bit activations can saturate. VNNI
    adds into 32 bits, so there the full range is safe and halves the activations'
    rounding: gpt2-small with random weights, labels equal to fp32's on 95.7 -> 98.3 % of
    600 messages, largest probability change 0.048 -> 0.030, at the same speed."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        packed = self._packed_params._packed_params
        return torch.ops.quantized.linear_dynamic(x, packed, reduce_range=False).to(x.dtype)


def quantize_int8(model: nn.Module) -> nn.Module:
    """``model`` with the Linear layers of its transformer blocks dynamically quantised to
    int8, weights per output channel; the classification head stays fp32. Activations use
    all 8 bits on CPUs with VNNI, 7 elsewhere (see :class:`FullRangeDynamicLinear`).

    Where the CPU has VNNI the weights are packed for oneDNN's kernels rather than the
    default x86 engine's (fbgemm's), with the same quantisation: a gpt2-small forward pass
    (64 messages of 40 tokens) takes 8 % less time; the whole corpus, random gpt2-small,
    139-145 against 124-130 messages/s, labels as fp32 on 98.74 % against 98.78 %.

    GELU takes its erf form, whose kernel runs 4.6x the tanh form's here: the two differ
    by at most 5e-4, far below the 8-bit rounding of the next layer's input. gpt2-small
    (random weights) on the whole corpus: labels as fp32 on 98.80 % (tanh) and 98.78 %
    (erf), 6 % faster.

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
    vnni = adds_int8_into_32_bits()
    engine = quantized_engine("onednn") if vnni else contextlib.nullcontext()
    with warnings.catch_warnings(), engine:
        warnings.filterwarnings("ignore", message=DEPRECATED_QUANTIZATION)
        mapping = {nn.Linear: FullRangeDynamicLinear if vnni else DynamicLinear}
        quantized = torch.ao.quantization.quantize_dynamic(model, blocks, torch.qint8, mapping)
    for module in quantized.modules():
        if isinstance(module, nn.GELU):
            module.approximate = "none"
    return quantized


def autocast_for(
    device: torch.device, precision: str = "auto"
) -> contextlib.AbstractContextManager:
    """bf16 autocast where asked, and on GPUs by default; fp32 on CPUs by default."""
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
