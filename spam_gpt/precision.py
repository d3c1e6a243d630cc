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
import logging
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from .model import TransformerBlock

TRAINING_PRECISIONS = ("auto", "fp32", "bf16")  # auto: bf16 on GPUs, fp32 on CPUs
WEIGHT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "int8": torch.float32}
INFERENCE_PRECISIONS = tuple(WEIGHT_DTYPES)
TINY = 1e-12  # the smallest step an int8 layer rounds on: a row of zeros stays zeros
# What torch.ao's dynamic quantisation warns of as it quantises the weights.
DEPRECATED_QUANTIZATION = r"torch\.(ao\.quantization is|quantize_per_tensor, )"
# What torch's compiler warns of as it loads, about torch's own code.
COMPILER_DEPRECATIONS = r"`torch\.jit\.script_method` is deprecated"
# oneDNN's int8 Linear takes an activation scale and zero point per pass: per token, the
# scale is applied after it (PerTokenInt8Linear).
UNIT_SCALE = torch.ones(())
ZERO_POINT = torch.zeros((), dtype=torch.int32)

logger = logging.getLogger(__name__)


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


def per_token_int8_runs_here() -> bool:
    """Whether ``--precision int8`` takes :class:`PerTokenInt8Linear` here: a CPU with VNNI
    and a torch with oneDNN (every x86 wheel)."""
    return adds_int8_into_32_bits() and torch.backends.mkldnn.is_available()


def round_per_token(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``rows`` in int8, each on its own step (its largest magnitude over 127), and the
    steps."""
    high, low = rows.amax(dim=1, keepdim=True), rows.amin(dim=1, keepdim=True)
    step = torch.maximum(high, low.neg_()).div_(127).clamp_min_(TINY)
    scaled = rows.mul(step.reciprocal())  # multiplying ran 4x faster than dividing
    return scaled.round_().to(torch.int8), step


def round_per_token_centred(
    rows: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``rows`` in int8 around the middle of each one's range, the steps and the middles."""
    high, low = rows.amax(dim=1, keepdim=True), rows.amin(dim=1, keepdim=True)
    centre = (high + low) / 2
    step = ((high - low) / 254).clamp_min_(TINY)
    scaled = rows.sub(centre).mul_(step.reciprocal())  # 1.6x addcmul's speed
    return scaled.round_().to(torch.int8), step, centre


class Rounding(NamedTuple):
    """How a :class:`PerTokenInt8Linear` rounds its input: around zero, and centred."""

    around_zero: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
    centred: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


EAGER_ROUNDING = Rounding(round_per_token, round_per_token_centred)


@functools.cache
def compiled_rounding() -> Rounding:
    """The rounding compiled by torch.compile, once per process, or :data:`EAGER_ROUNDING`
    with a warning where it cannot compile (it needs a C++ compiler).

    Eager, rounding a pass reads and writes it five times (largest, smallest, scaled,
    rounded, converted); compiled, it is read twice and written once as int8. gpt2-small
    ran 1.08x as fast with one thread and 1.07x with two (benchmarks/RESULTS.md). It costs
    about 11 s the first time on a machine and 3 s (half of it importing torch's compiler)
    once torch's compile cache holds it.
    """
    import torch._inductor.config

    inductor = torch._inductor.config
    inductor.compile_threads = 1  # no pool of compiling processes per actor
    if inductor.cpp.vec_isa_ok is None:  # unless TORCHINDUCTOR_VEC_ISA_OK says otherwise,
        # trust the CPU's flags: probing each vector width by building and loading a
        # library in a child process cost 1.3 s of each process's 3.1 s here.
        inductor.cpp.vec_isa_ok = True
    compiled = Rounding(*(torch.compile(f, dynamic=True, fullgraph=True) for f in EAGER_ROUNDING))
    try:
        with torch.inference_mode(), warnings.catch_warnings():  # as predictors call it
            warnings.filterwarnings("ignore", message=COMPILER_DEPRECATIONS)
            for function in compiled:  # compiled now, one graph each, on a pass's size:
                function(torch.randn(512, 768))  # a tiny one left it on one thread
    except Exception as error:  # whatever failed, the eager rounding still serves
        reason = str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
        logger.warning(
            "int8 rounds without torch.compile, about 7 %% slower (%s); torch.compile "
            "needs a C++ compiler such as g++",
            reason,
        )
        return EAGER_ROUNDING
    return compiled


class PerTokenInt8Linear(nn.Module):
    """A Linear layer in int8 for CPUs with VNNI: weights rounded per output channel, and
    each token's activations rounded on their own scale, multiplied by oneDNN's int8 Linear
    kernel (``torch.ops.onednn.qlinear_pointwise``, what torch's compiler emits for int8
    Linear layers on x86), on weights packed for it once.

    torch.ao's dynamic Linear rounds all activations of a pass on one scale, set by the
    largest of them (about 1.45 times a typical token's largest here), so most tokens get
    coarser steps than they need; per token, gpt2-small with random weights keeps fp32's
    label on 99.16 % of the corpus instead of 98.87 %, largest change 0.019 instead of 0.030
    (benchmarks/RESULTS.md).

    The kernel takes one activation scale per pass, so it gets 1 and turns the int32 sums
    into fp32 times the weights' scales; each token's scale and the bias come after. On an
    Intel Xeon with AMX this ran gpt2-small 1.36x (two threads) and 1.53x (one) as fast as
    torch's ``_int_mm`` with the conversion and scaling as separate passes.

    ``centred``: a layer fed by a GELU sees values from -0.17 up, so rounding around the
    middle of each token's range, not around zero, spends all 255 steps on it; the offset
    comes back exactly as the centre times each output's weight sum.
    """

    def __init__(
        self, linear: nn.Linear, centred: bool = False, rounding: Rounding = EAGER_ROUNDING
    ):
        super().__init__()
        self.rounding = rounding
        weight = linear.weight.detach().float()
        scale = weight.abs().amax(dim=1).clamp_min(TINY) / 127
        rounded = (weight / scale[:, None]).round().clamp(-127, 127).to(torch.int8)
        # oneDNN's own layout, opaque to state_dict and copies: an attribute, not a buffer.
        self.packed = torch.ops.onednn.qlinear_prepack(rounded, None)
        self.register_buffer("weight_scale", scale)
        self.register_buffer("weight_zero_points", torch.zeros(len(weight), dtype=torch.int32))
        bias = linear.bias if linear.bias is not None else torch.zeros(len(weight))
        self.register_buffer("bias", bias.detach().float().clone())
        self.centred = centred
        # What the int8 product leaves out of a centred input, with the weights as rounded.
        sums = rounded.float().sum(dim=1) * scale if centred else None
        self.register_buffer("weight_sums", sums)

    def rounded_weight(self) -> torch.Tensor:
        """The weights as the products use them, in fp32 and nn.Linear's [out, in]."""
        return self.packed.to_dense().t().float() * self.weight_scale[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        if self.centred:
            rounded, step, centre = self.rounding.centred(rows)
        else:
            rounded, step = self.rounding.around_zero(rows)
        out = torch.ops.onednn.qlinear_pointwise.tensor(
            rounded, UNIT_SCALE, ZERO_POINT, self.packed, self.weight_scale,
            self.weight_zero_points, None, 1.0, 0, torch.float32, "none", [], "",
        )  # fmt: skip
        torch.addcmul(self.bias, out, step, out=out)  # one pass, not a product and a sum
        if self.centred:
            out.addr_(centre.squeeze(1), self.weight_sums)
        return out.reshape(*x.shape[:-1], -1)


def quantize_int8(model: nn.Module, compiled: bool = False) -> nn.Module:
    """``model`` with the Linear layers of its transformer blocks in int8 (replaced in
    place), weights per output channel; the classification head stays fp32.

    Where the CPU has VNNI (AVX512-VNNI, AVX-VNNI, AMX-INT8), whose int8 dot products add
    straight into 32 bits, and torch has oneDNN (every x86 wheel), each layer becomes a
    :class:`PerTokenInt8Linear`. Elsewhere it is PyTorch's own dynamic quantisation
    (``torch.ao.quantization``, deprecated in favour of torchao), whose 7-bit activations
    (``reduce_range``) keep fbgemm's AVX2 kernels from saturating their 16-bit sums; its
    deprecation warnings are silenced here only. torchao itself ran 70 messages/s against
    torch.ao's 124 on gpt2-small (two threads, 128 corpus messages) and is not a
    dependency; see benchmarks/RESULTS.md.

    GELU takes its erf form, whose kernel runs 4.6x the tanh form's here: the two differ
    by at most 5e-4, far below the 8-bit rounding of the next layer's input. gpt2-small
    (random weights) on the whole corpus: labels as fp32 on 98.80 % (tanh) and 98.78 %
    (erf), 6 % faster.

    ``compiled``: the per-token layers round with :func:`compiled_rounding`, for
    predictors that run long enough to repay compiling it.
    """
    if per_token_int8_runs_here():
        model = per_token_int8(model, compiled_rounding() if compiled else EAGER_ROUNDING)
    else:
        model = torch_ao_int8(model)
    for module in model.modules():
        if isinstance(module, nn.GELU):
            module.approximate = "none"
    return model


def transformer_blocks(model: nn.Module) -> list[TransformerBlock]:
    """The blocks whose Linear layers int8 quantises (the head is outside them)."""
    return [module for module in model.modules() if isinstance(module, TransformerBlock)]


def per_token_int8(model: nn.Module, rounding: Rounding = EAGER_ROUNDING) -> nn.Module:
    """``model`` with its blocks' Linear layers as :class:`PerTokenInt8Linear`s rounding
    with ``rounding``, the one fed by the GELU centred."""
    for block in transformer_blocks(model):
        for name, module in list(block.named_modules()):
            if isinstance(module, nn.Linear):
                parent, _, attribute = name.rpartition(".")
                centred = module is block.ff.layers[2]
                int8 = PerTokenInt8Linear(module, centred, rounding)
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
