"""bf16 weights for the few-row matmuls of decoding on a CPU; fp32 for everything else.

Why: on these machines (AVX2, no AVX-512 bf16) decoding one answer is bound by memory bandwidth. Each new
token reads every weight of the language model once, and a (1, 576) x (576, 1536) fp32 product takes about
540 us where the same product with bf16 weights takes about 175 us (``benchmarks/decode_precision.py``).
Products over many rows (the prompt's prefill, batches of 8) are compute-bound, and there bf16 is as
slow or slower (16 rows: 2.2 ms against 0.95 ms), because this CPU has no bf16 arithmetic. So each linear
layer keeps its fp32 weight and gets a bf16 copy, and picks by the number of rows it is given.

Why hand-written: torch's dynamic int8 quantisation (``torch.ao.quantization.quantize_dynamic``) and a
whole-model ``.to(torch.bfloat16)`` were tried first. int8 broke the answers' wording ("The image shows
pronounced." for "The image suffers from obvious photo editing."), and whole-model bf16 made the prefill
3x slower. Neither picks a precision per call.

Only inference uses it (``Assistant.from_pretrained``), after the LoRA update is merged: the switch is
off while grad is enabled, so a training step never sees the bf16 copy. Norms, attention, the residual
stream and the logits' softmax stay fp32. A small product rounds its input and weights to bf16 (relative
error about 2**-9), accumulates in fp32 inside oneDNN, and rounds its result to bf16 before it is cast
back (torch has no bf16 x bf16 -> fp32 product on the CPU). Answers can still differ from exact fp32 where
two tokens were nearly tied: ``loupe eval --decode-precision fp32`` against the default measures it.
"""

from __future__ import annotations

import torch
from torch import nn

CHOICES = ("auto", "bf16", "fp32")
HELP = ("precision of the language model's weights while decoding: auto (default: bf16 copies for the "
        "one-to-four-row products of decoding on a CPU, about 1.5-2x faster per token; fp32 for the prompt "
        "and for batches), bf16 (the same, on any device) or fp32 (exact, the weights as trained)")
MAX_ROWS = 4
"""At most this many rows take the bf16 copy: measured faster up to 4 rows, equal at 8, slower above."""


class _DecodeLinear(nn.Linear):
    """An ``nn.Linear`` that also holds a bf16 copy of its weight for products of few rows.

    Instances are made by changing the class of an existing ``nn.Linear`` (``enable``), so the module's
    parameters, their ties (the LM head shares the embedding matrix) and the state dict's keys are
    exactly what they were; the copy is a non-persistent buffer.
    """

    weight_bf16: torch.Tensor
    bias_bf16: torch.Tensor | None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // max(1, x.shape[-1])
        if rows > MAX_ROWS or torch.is_grad_enabled() or x.dtype != torch.float32:
            return super().forward(x)
        return nn.functional.linear(x.to(torch.bfloat16), self.weight_bf16, self.bias_bf16).to(x.dtype)


def enable(model: nn.Module) -> int:
    """Give every fp32 ``nn.Linear`` under ``model`` a bf16 copy for decoding; returns how many.

    Call it after ``merge_and_unload`` (a peft ``LoraLayer`` is not an ``nn.Linear`` and is left alone)
    and after the model is on its device. Idempotent.
    """
    n = 0
    for module in model.modules():
        if type(module) is _DecodeLinear:
            n += 1
            continue
        if type(module) is not nn.Linear or module.weight.dtype != torch.float32:
            continue
        module.__class__ = _DecodeLinear
        module.register_buffer("weight_bf16", module.weight.detach().to(torch.bfloat16), persistent=False)
        bias = None if module.bias is None else module.bias.detach().to(torch.bfloat16)
        module.register_buffer("bias_bf16", bias, persistent=False)
        n += 1
    return n


def disable(model: nn.Module) -> int:
    """Undo ``enable``: plain fp32 ``nn.Linear`` layers again, the copies dropped; returns how many."""
    n = 0
    for module in model.modules():
        if type(module) is _DecodeLinear:
            del module.weight_bf16, module.bias_bf16
            module.__class__ = nn.Linear
            n += 1
    return n


def resolve(choice: str, device: str) -> bool:
    """Whether ``choice`` (one of ``CHOICES``) turns the bf16 copies on for ``device``."""
    if choice not in CHOICES:
        raise ValueError(f"decode precision {choice!r}: use one of {', '.join(CHOICES)}")
    if choice == "auto":
        return str(device).startswith("cpu")
    return choice == "bf16"
