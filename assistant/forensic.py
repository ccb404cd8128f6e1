"""A dedicated forensic network: where an image was tampered with, and whether it was.

``ForensicNet`` is EfficientNet-Lite0 (ImageNet-pretrained, from PyPI) with a small feature-pyramid
decoder and a fixed high-pass (SRM-style) branch. It is trained on forgery localisation alone
(``loupe train forensic``), so its stages are free to learn traces the shared image encoder, which also
feeds the language model, cannot. It returns a tampering map (logits at 1/4 resolution) and an
image-level tampered logit.

When a checkpoint holds ``forensic.safetensors``, forgery questions (``Assistant``) read their tampering map
from this network instead of the auxiliary heads. ``LoupeConfig.verdict_map`` reads its image-level logit in
place of the heads' largest map logit (fitted so by ``loupe train calibrate --map``), the pasted copy of a
duplicated region is the one its map marks more strongly, and each mask is the average of the mask decoder's
probability and its map's. Chat answers do not run
it. Hand-written because no library ships a forgery localiser on EfficientNet-Lite0 for a CPU; the layers
are torch's and the trunk is the ``efficientnet-lite-pytorch`` package's.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .modeling import efficientnet_lite0, efficientnet_taps

FORENSIC_FILE = "forensic.safetensors"
FORMAT = "loupe-forensic-1"
SIDE = 224  # the network sees every image at SIDE x SIDE (the builders' forgery images are at most 224 px)


class ForensicError(ValueError):
    """A forensic weights file that cannot be used."""


def _srm_kernels() -> torch.Tensor:
    """Three fixed 5x5 high-pass kernels (SRM-style residuals that expose noise and resampling). (3, 1, 5, 5)"""
    k1 = torch.zeros(5, 5)
    k1[2, 1:4] = torch.tensor([1.0, -2.0, 1.0]) / 2
    k2 = torch.tensor([[0, 0, 0, 0, 0], [0, -1, 2, -1, 0], [0, 2, -4, 2, 0], [0, -1, 2, -1, 0], [0, 0, 0, 0, 0]],
                      dtype=torch.float32) / 4
    k3 = torch.tensor([[-1, 2, -2, 2, -1], [2, -6, 8, -6, 2], [-2, 8, -12, 8, -2], [2, -6, 8, -6, 2],
                       [-1, 2, -2, 2, -1]], dtype=torch.float32) / 12
    return torch.stack([k1, k2, k3]).unsqueeze(1)


def _cbr(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class ForensicNet(nn.Module):
    """``forward(rgb)`` with rgb (B, 3, H, W) in [0, 1] (H, W multiples of 32) returns (map logits
    (B, H/4, W/4), image logits (B,))."""

    TAPS = (0, 2, 4, 10, 15)  # EfficientNet-Lite0 blocks ending strides 2, 4, 8, 16, 32
    CHANNELS = (16, 24, 40, 112, 320)

    def __init__(self, pretrained: bool = False, width: int = 64):
        super().__init__()
        net = efficientnet_lite0(pretrained)
        self.stem = nn.Sequential(net._conv_stem, net._bn0, nn.ReLU6())
        self.blocks = net._blocks[:self.TAPS[-1] + 1]
        self.register_buffer("srm", _srm_kernels(), persistent=False)
        # the high-pass branch: residuals of the grey image, at 1/4 resolution beside the trunk's stride-4 map
        self.noise = nn.Sequential(_cbr(3, 16, 2), _cbr(16, 24, 2))
        self.lateral = nn.ModuleList(nn.Conv2d(c, width, 1) for c in self.CHANNELS[2:])
        self.low = nn.Conv2d(self.CHANNELS[1] + 24, width, 1)
        self.smooth = nn.Sequential(_cbr(width, width), _cbr(width, width))
        self.map_head = nn.Conv2d(width, 1, 1)
        self.image_head = nn.Sequential(nn.Linear(self.CHANNELS[-1] + 2, 64), nn.ReLU(inplace=True), nn.Linear(64, 1))

    def forward(self, rgb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        _, s4, s8, s16, s32 = efficientnet_taps(self.stem, self.blocks, self.TAPS, rgb)
        grey = (rgb * torch.tensor([0.299, 0.587, 0.114], device=rgb.device).view(1, 3, 1, 1)).sum(1, keepdim=True)
        res = (F.conv2d(F.pad(grey * 255.0, (2, 2, 2, 2), mode="reflect"), self.srm) / 4.0).clamp(-3, 3)
        top = self.lateral[2](s32)
        for lat, feat in ((self.lateral[1], s16), (self.lateral[0], s8)):
            top = lat(feat) + F.interpolate(top, size=feat.shape[-2:], mode="bilinear", align_corners=False)
        low = self.low(torch.cat([s4, self.noise(res)], dim=1))
        y = self.smooth(low + F.interpolate(top, size=low.shape[-2:], mode="bilinear", align_corners=False))
        logits = self.map_head(y)[:, 0]  # (B, H/4, W/4)
        flat = logits.flatten(1)
        k = max(1, flat.shape[1] // 20)
        pooled = torch.cat([s32.mean(dim=(2, 3)), flat.amax(1, keepdim=True),
                            flat.topk(k, dim=1).values.mean(1, keepdim=True)], 1)
        return logits, self.image_head(pooled)[:, 0]


def to_input(image: Any) -> torch.Tensor:
    """A PIL image or (H, W, 3) uint8 array -> (3, SIDE, SIDE) float in [0, 1], as the network sees it."""
    from PIL import Image

    if not isinstance(image, Image.Image):
        image = Image.fromarray(np.asarray(image))
    image = image.convert("RGB")
    if image.size != (SIDE, SIDE):
        image = image.resize((SIDE, SIDE), Image.BILINEAR)
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float() / 255.0


SCALE = ".int8_scale"  # the key suffix of an int8-stored weight's per-output-channel scales


def save_forensic(net: ForensicNet, path: Path, meta: dict[str, Any] | None = None) -> None:
    """Write the network's weights as safetensors, atomically, with the format and ``meta`` in the header.

    Every conv and linear weight is stored as int8 with one scale per output channel (symmetric), the rest
    (biases, batch-norm statistics) in half precision: 3.3 MB instead of 12.4, so the shipped model stays
    within its size budget. Loading dequantises to float32; on the forgery validation split the map's
    pixel-F1 moved by 0.002 and the AUCs by 0.001. Hand-written: safetensors stores plain tensors only, and
    torch's quantised tensors are deprecated."""
    from safetensors.torch import save_file

    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    state: dict[str, torch.Tensor] = {}
    for k, v in net.state_dict().items():
        v = v.detach().cpu()
        if v.is_floating_point() and v.dim() >= 2:
            scale = (v.abs().amax(dim=tuple(range(1, v.dim()))) / 127.0).clamp_min(1e-12).float()
            shape = (-1, *([1] * (v.dim() - 1)))
            state[k] = torch.round(v.float() / scale.view(shape)).clamp(-127, 127).to(torch.int8).contiguous()
            state[k + SCALE] = scale.contiguous()
        else:
            state[k] = (v.half() if v.is_floating_point() else v).contiguous()
    save_file(state, str(tmp), metadata={"format": FORMAT, "meta": json.dumps(meta or {})})
    tmp.replace(path)


def _dequantised(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in state.items():
        if k.endswith(SCALE):
            continue
        if k + SCALE in state:
            scale = state[k + SCALE].float()
            out[k] = v.float() * scale.view(-1, *([1] * (v.dim() - 1)))
        else:
            out[k] = v.float() if v.is_floating_point() else v
    return out


def load_forensic(path: Path) -> ForensicNet:
    """The ``ForensicNet`` of a ``forensic.safetensors`` (eval mode). Raises ``ForensicError`` naming the
    file when it is not one."""
    from safetensors import safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors raises several types for a corrupt or truncated file
        raise ForensicError(f"{path}: not a readable safetensors file ({exc}); "
                            "run `loupe train forensic` again") from None
    if header.get("format") != FORMAT:
        raise ForensicError(f"{path}: format {header.get('format')!r}, expected {FORMAT!r}; "
                            "run `loupe train forensic` to write it")
    net = ForensicNet(pretrained=False)
    try:
        net.load_state_dict(_dequantised(state))
    except RuntimeError as exc:
        raise ForensicError(f"{path}: its weights do not fit this version's ForensicNet ({exc}); "
                            "run `loupe train forensic` again") from None
    return net.eval()


def load_forensic_model(checkpoint: str | Path) -> ForensicNet | None:
    """The checkpoint's forensic network, or None where it has none."""
    path = Path(checkpoint) / FORENSIC_FILE
    return load_forensic(path) if path.is_file() else None


@torch.no_grad()
def forensic_maps(net: ForensicNet, images: list[Any]) -> list[tuple[torch.Tensor, float]]:
    """Per image (PIL or array): (map logits (SIDE/4, SIDE/4), image logit), each the mean of the network's
    reading of the image and of its mirror image (mirrored back). The mirror costs one more pass; on the
    forgery validation split it raised the image logit's AUC 0.888 -> 0.897 and the map's pixel-F1 0.616 ->
    0.628."""
    if not images:
        return []
    x = torch.stack([to_input(im) for im in images])
    maps, logits = net(torch.cat([x, x.flip(-1)]))
    n = len(images)
    maps = (maps[:n] + maps[n:].flip(-1)) / 2
    logits = (logits[:n] + logits[n:]) / 2
    return [(maps[i], float(logits[i])) for i in range(n)]
