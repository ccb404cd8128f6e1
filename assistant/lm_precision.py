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

import threading

import torch
from torch import nn

CHOICES = ("auto", "fp16", "fp32")
HELP = ("weights of the language model while answering: auto (default: fp16 weights packed by fbgemm on a "
        "CPU that has it, about 2x faster per token, inputs and sums still fp32; fp32 elsewhere), fp16 (the "
        "same, or an error where it cannot run) or fp32 (exact, the weights as trained)")


def available() -> bool:
    """Whether this torch build has fbgemm (x86 CPUs; not ARM, not the GPU)."""
    return "fbgemm" in torch.backends.quantized.supported_engines


SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
"""Linear layers of one block that read the same input (attention's projections, a gated MLP's two halves).

``enable`` packs each such set as one product (``_Group``): fewer, wider products over the same bytes. At
one row, as in every decoding step, a packed product has a fixed cost of about 30 us, so for SmolLM2 the
five products of a layer cost 225 us as five and 123 us as two, with the same numbers out (fbgemm sums
each output column alone, so stacking the weights changes no bit; ``tests/assistant/test_lm_precision.py``
checks it)."""


class _Group:
    """One packed product for sibling linear layers that are called on the same input tensor.

    The first member called on ``x`` computes every member's output at once and keeps the others' parts;
    each member then takes its own part, whatever the order. A call on another tensor, or on ``x`` after an
    in-place change (its version counter moved), or a second call of the same member, computes afresh, so
    a model that feeds the members different inputs still gets the right outputs, only more slowly.
    (Under ``torch.inference_mode`` tensors have no version counter, so there only identity is checked.)
    """

    def __init__(self, members: list[nn.Linear]):
        weights = torch.cat([m.weight.detach() for m in members])
        biases = None if members[0].bias is None else torch.cat([m.bias.detach() for m in members])
        self.packed = torch.ops.quantized.linear_prepack_fp16(weights, biases)
        self.sizes = [m.out_features for m in members]
        # the kept parts are per thread: two threads running one model (the demo's queue, a server) each
        # keep their own, so one thread never takes a part computed from the other's input
        self._local = threading.local()

    def output(self, index: int, x: torch.Tensor) -> torch.Tensor:
        state = self._local
        # tensors made under torch.inference_mode keep no version counter: for them only identity is checked
        version = -1 if x.is_inference() else x._version
        parts = getattr(state, "parts", None)
        if x is not getattr(state, "input", None) or version != state.version or parts[index] is None:
            parts = list(torch.ops.quantized.linear_dynamic_fp16(x, self.packed).split(self.sizes, dim=-1))
            state.parts, state.input, state.version = parts, x, version
        part, parts[index] = parts[index], None
        if all(p is None for p in parts):
            state.input = None  # every part handed out: hold no tensors between steps
        return part


class _PackedLinear(nn.Linear):
    """An ``nn.Linear`` that also holds an fbgemm-packed fp16 copy of its weight and bias.

    Instances are made by changing the class of an existing ``nn.Linear`` (``enable``), so the module's
    parameters, their ties (the LM head shares the embedding matrix) and the state dict's keys are
    exactly what they were. The packed copy is a plain attribute, not a buffer: it is never saved. A layer
    with siblings (``SIBLINGS``) holds its ``_Group`` and its place in it instead of a copy of its own.
    """

    packed_fp16: torch.Tensor | None
    fp16_group: tuple[_Group, int] | None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() or x.dtype != torch.float32 or x.device.type != "cpu":
            return super().forward(x)
        if self.fp16_group is not None:
            group, index = self.fp16_group
            return group.output(index, x)
        return torch.ops.quantized.linear_dynamic_fp16(x, self.packed_fp16)


def _plain(module: nn.Module | None) -> bool:
    return (type(module) is nn.Linear and module.weight.dtype == torch.float32
            and module.weight.device.type == "cpu")


def enable(model: nn.Module, group_siblings: bool = True) -> int:
    """Give every fp32 CPU ``nn.Linear`` under ``model`` its packed fp16 copy; returns how many have one.

    With ``group_siblings``, sibling layers (``SIBLINGS``: same input size, all with or all without a bias)
    share one packed product. Call it after ``merge_and_unload`` (a peft ``LoraLayer`` is not an
    ``nn.Linear`` and is left alone) and after the model is on its device. Idempotent; the copy reflects the weights at the time of
    the call.
    """
    if not available():
        raise RuntimeError("fp16 LM weights need torch's fbgemm kernels, which this build of torch lacks "
                           "(they exist on x86 CPUs); use --lm-precision fp32")
    for parent in list(model.modules()) if group_siblings else []:
        for names in SIBLINGS:
            members = [getattr(parent, name, None) for name in names]
            if not all(_plain(m) for m in members):
                continue
            if len({m.in_features for m in members}) != 1 or len({m.bias is None for m in members}) != 1:
                continue
            group = _Group(members)
            for index, member in enumerate(members):
                member.__class__ = _PackedLinear
                member.packed_fp16, member.fp16_group = None, (group, index)
    n = 0
    for module in model.modules():
        if type(module) is _PackedLinear:
            n += 1
            continue
        if not _plain(module):
            continue
        bias = None if module.bias is None else module.bias.detach()
        packed = torch.ops.quantized.linear_prepack_fp16(module.weight.detach(), bias)
        module.__class__ = _PackedLinear
        module.packed_fp16, module.fp16_group = packed, None
        n += 1
    return n


def disable(model: nn.Module) -> int:
    """Undo ``enable``: plain fp32 ``nn.Linear`` layers again, the copies dropped; returns how many."""
    n = 0
    for module in model.modules():
        if type(module) is _PackedLinear:
            del module.packed_fp16, module.fp16_group
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
