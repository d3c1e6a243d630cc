"""Where bf16 and int8 run: autocast for training; bf16 weights or int8 Linear layers for
inference.

bf16 matrix units (AMX, AVX512-BF16 on CPUs; every recent GPU) run bf16 several times
faster than fp32. Training keeps fp32 weights and autocasts the forward pass; inference
simply holds bf16 weights. On a CPU without those units bf16 is slower, so fp32 stays
the CPU default. int8 is for CPUs: the transformer's Linear layers with int8 weights, their
activations rounded to int8 as each pass runs.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from pathlib import Path

import torch
from torch import nn

from .model import TransformerBlock

TRAINING_PRECISIONS = ("auto", "fp32", "bf16")  # auto: bf16 on GPUs, fp32 on CPUs
WEIGHT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "int8": torch.float32}
INFERENCE_PRECISIONS = tuple(WEIGHT_DTYPES)
TINY = 1e-12  # the smallest step an int8 layer rounds on: a row of zeros stays zeros
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


class PerTokenInt8Linear(nn.Module):
    """A Linear layer in int8 for CPUs with VNNI: weights rounded per output channel, and
    each token's activations rounded on their own scale, multiplied by torch's int8 matrix
    product (``torch._int_mm``, the kernel torchao's CPU int8 path calls).

    torch.ao's dynamic Linear rounds all activations of a pass on one scale, set by the
    largest of them (about 1.45 times a typical token's largest here), so most tokens get
    coarser steps than they need; per token, gpt2-small with random weights keeps fp32's
    label on 99.16 % of the corpus instead of 98.87 %, largest change 0.019 instead of 0.030,
    at 6-9 % less speed in process (benchmarks/RESULTS.md).

    ``centred``: a layer fed by a GELU sees values from -0.17 up, so rounding around the
    middle of each token's range, not around zero, spends all 255 steps on it; the offset
    comes back exactly as the centre times each output's weight sum.
    """

    def __init__(self, linear: nn.Linear, centred: bool = False):
        super().__init__()
        weight = linear.weight.detach().float()
        scale = weight.abs().amax(dim=1).clamp_min(TINY) / 127
        rounded = (weight / scale[:, None]).round().clamp(-127, 127).to(torch.int8)
        self.register_buffer("weight_t", rounded.t().contiguous())  # _int_mm's [in, out]
        self.register_buffer("weight_scale", scale)
        bias = linear.bias if linear.bias is not None else torch.zeros(len(weight))
        self.register_buffer("bias", bias.detach().float().clone())
        self.centred = centred
        # What the int8 product leaves out of a centred input, with the weights as rounded.
        sums = rounded.float().sum(dim=1) * scale if centred else None
        self.register_buffer("weight_sums", sums)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        high, low = rows.amax(dim=1, keepdim=True), rows.amin(dim=1, keepdim=True)
        if self.centred:
            centre = (high + low) / 2
            step = ((high - low) / 254).clamp_min_(TINY)
        else:
            step = torch.maximum(high, low.neg_()).div_(127).clamp_min_(TINY)
        inverse = step.reciprocal()  # multiplying ran 4x faster than dividing (1,024 x 768)
        if self.centred:
            scaled = torch.addcmul(centre.mul(inverse).neg_(), rows, inverse)
        else:
            scaled = rows.mul(inverse)
        rounded = scaled.round_().to(torch.int8)
        out = torch._int_mm(rounded, self.weight_t).to(torch.float32)
        out.mul_(step).mul_(self.weight_scale).add_(self.bias)
        if self.centred:
            out.addr_(centre.squeeze(1), self.weight_sums)
        return out.reshape(*x.shape[:-1], -1)


def quantize_int8(model: nn.Module) -> nn.Module:
    """``model`` with the Linear layers of its transformer blocks in int8 (replaced in
    place), weights per output channel; the classification head stays fp32.

    Where the CPU has VNNI (AVX512-VNNI, AVX-VNNI, AMX-INT8), whose int8 dot products add
    straight into 32 bits, each layer becomes a :class:`PerTokenInt8Linear`. Elsewhere it is
    PyTorch's own dynamic quantisation (``torch.ao.quantization``, deprecated in favour of
    torchao), whose 7-bit activations (``reduce_range``) keep fbgemm's AVX2 kernels from
    saturating their 16-bit sums; its deprecation warnings are silenced here only. torchao
    itself ran 70 messages/s against torch.ao's 124 on gpt2-small (two threads, 128
    corpus messages) and is not a dependency; see benchmarks/RESULTS.md.

    GELU takes its erf form, whose kernel runs 4.6x the tanh form's here: the two differ
    by at most 5e-4, far below the 8-bit rounding of the next layer's input. gpt2-small
    (random weights) on the whole corpus: labels as fp32 on 98.80 % (tanh) and 98.78 %
    (erf), 6 % faster.
    """
    model = per_token_int8(model) if adds_int8_into_32_bits() else torch_ao_int8(model)
    for module in model.modules():
        if isinstance(module, nn.GELU):
            module.approximate = "none"
    return model


def transformer_blocks(model: nn.Module) -> list[TransformerBlock]:
    """The blocks whose Linear layers int8 quantises (the head is outside them)."""
    return [module for module in model.modules() if isinstance(module, TransformerBlock)]


def per_token_int8(model: nn.Module) -> nn.Module:
    """``model`` with its blocks' Linear layers as :class:`PerTokenInt8Linear`s, the one fed
    by the GELU centred."""
    for block in transformer_blocks(model):
        for name, module in list(block.named_modules()):
            if isinstance(module, nn.Linear):
                parent, _, attribute = name.rpartition(".")
                int8 = PerTokenInt8Linear(module, centred=module is block.ff.layers[2])
                setattr(block.get_submodule(parent), attribute, int8)
    return model


def torch_ao_int8(model: nn.Module) -> nn.Module:
    """``model`` with its blocks' Linear layers in torch.ao's dynamic int8, per channel."""
    from torch.ao.quantization import per_channel_dynamic_qconfig

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=DEPRECATED_QUANTIZATION)
        for block in transformer_blocks(model):
            torch.ao.quantization.quantize_dynamic(
                block, {nn.Linear: per_channel_dynamic_qconfig}, torch.qint8, inplace=True
            )
    return model


def autocast_for(
    device: torch.device, precision: str = "auto"
) -> contextlib.AbstractContextManager:
    """bf16 autocast where asked, and on GPUs by default; fp32 on CPUs by default."""
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
