"""fp16 weights, packed by fbgemm, for the language model's linear layers when answering on a CPU.

Why: on these machines (AVX2) writing an answer is bound by how fast the LM's weights are read and by
fp32 matrix products over few rows, which torch runs poorly (a (8, 576) x (576, 1536) product takes about
850 us, more than the same product over 1 row). fbgemm's fp16-weight product (the kernel behind torch's
dynamic fp16 quantisation) keeps a pre-packed fp16 copy of each weight, converts it to fp32 inside the
kernel, and multiplies fp32 activations in fp32. Measured here (``benchmarks/lm_precision.py``):
173 against 684 us at 1 row, 302 against 849 at 8, 824 against 1213 at 51, and 5.7 against 6.7 ms at
400 rows; the LM head (576 -> 49157) 3.7 against 16 ms for one token.

Numerics: only the weights are rounded, to fp16 (relative error about 2**-11); inputs, sums and outputs
stay fp32, so this is closer to exact fp32 than bf16 weights are (max error 0.02 against 0.47 on a random
product of this shape). Answers can still differ from exact fp32 where two tokens were nearly tied:
``loupe eval --lm-precision fp16`` against its default ``fp32`` measures it.

Why hand-written: ``torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.float16)``
uses the same kernel but replaces every module. That drops the fp32 weights that the head's tie to the
embedding matrix and export read, and it cannot be undone. Here each ``nn.Linear`` keeps its fp32
parameters and gains the packed copy, which it uses only while grad is off (so a training step never sees
it). dynamic int8 quantisation and whole-model bf16 were tried first: int8 rewrote the answers ("The image
shows pronounced." for "The image suffers from obvious photo editing."), and bf16 made the prompt 3x
slower on this CPU, which has no bf16 arithmetic.
"""

from __future__ import annotations

import torch
from torch import nn

CHOICES = ("auto", "fp16", "fp32")
HELP = ("weights of the language model while answering: auto (default: fp16 weights packed by fbgemm on a "
        "CPU that has it, about 2x faster per token, inputs and sums still fp32; fp32 elsewhere), fp16 (the "
        "same, or an error where it cannot run) or fp32 (exact, the weights as trained)")


def available() -> bool:
    """Whether this torch build has fbgemm (x86 CPUs; not ARM, not the GPU)."""
    return "fbgemm" in torch.backends.quantized.supported_engines


class _PackedLinear(nn.Linear):
    """An ``nn.Linear`` that also holds an fbgemm-packed fp16 copy of its weight and bias.

    Instances are made by changing the class of an existing ``nn.Linear`` (``enable``), so the module's
    parameters, their ties (the LM head shares the embedding matrix) and the state dict's keys are
    exactly what they were. The packed copy is a plain attribute, not a buffer: it is never saved.
    """

    packed_fp16: torch.Tensor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() or x.dtype != torch.float32 or x.device.type != "cpu":
            return super().forward(x)
        return torch.ops.quantized.linear_dynamic_fp16(x, self.packed_fp16)


def enable(model: nn.Module) -> int:
    """Give every fp32 CPU ``nn.Linear`` under ``model`` its packed fp16 copy; returns how many have one.

    Call it after ``merge_and_unload`` (a peft ``LoraLayer`` is not an ``nn.Linear`` and is left alone)
    and after the model is on its device. Idempotent; the copy reflects the weights at the time of the call.
    """
    if not available():
        raise RuntimeError("fp16 LM weights need torch's fbgemm kernels, which this build of torch lacks "
                           "(they exist on x86 CPUs); use --lm-precision fp32")
    n = 0
    for module in model.modules():
        if type(module) is _PackedLinear:
            n += 1
            continue
        if type(module) is not nn.Linear or module.weight.dtype != torch.float32 or module.weight.device.type != "cpu":
            continue
        bias = None if module.bias is None else module.bias.detach()
        packed = torch.ops.quantized.linear_prepack_fp16(module.weight.detach(), bias)
        module.__class__ = _PackedLinear
        module.packed_fp16 = packed
        n += 1
    return n


def disable(model: nn.Module) -> int:
    """Undo ``enable``: plain fp32 ``nn.Linear`` layers again, the copies dropped; returns how many."""
    n = 0
    for module in model.modules():
        if type(module) is _PackedLinear:
            del module.packed_fp16
            module.__class__ = nn.Linear
            n += 1
    return n


def resolve(choice: str, device: str) -> bool:
    """Whether ``choice`` (one of ``CHOICES``) turns the packed fp16 copies on for ``device``."""
    if choice not in CHOICES:
        raise ValueError(f"LM precision {choice!r}: use one of {', '.join(CHOICES)}")
    on_cpu = str(device).startswith("cpu")
    if choice == "auto":
        return on_cpu and available()
    if choice == "fp16" and not (on_cpu and available()):
        raise ValueError(f"LM precision 'fp16' runs on a CPU with fbgemm only (device {device!r}"
                         f"{'' if available() else ', and this torch has no fbgemm'}); use fp32 or auto")
    return choice == "fp16"
