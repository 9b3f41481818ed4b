"""Image backbones by name, each cut to return a spatial feature map (B, C, h, w), never a pooled vector.

Why spatial maps: SA-CMF turns the map into image tokens for the cross-camera Transformer, and the
detection head needs positions. Why cut early (``stride`` 8 by default): deep-space frames are small
(64-128 px) and targets are a few pixels wide, so a stride-32 map would be 2x2 cells; the deeper layers
also dominate the cost on a 2-core CPU.

Single-channel frames are repeated to 3 channels for the torchvision networks (so a torchvision /
ImageNet weight file loads unchanged; the cost of the first convolution on 3 identical channels is
negligible), then normalised the way those weights expect. The ``tiny`` CNN takes 1 channel natively.

Weights: random initialisation by default; ``weights=PATH`` loads a local state_dict with
``torch.load(weights_only=True)`` (never a download). A file saved from the full torchvision classifier
(including ``fc``, ``AuxLogits``, the cut layers) loads too: keys of layers this backbone does not use
are ignored, every key it does use must be present with the right shape, otherwise
:class:`BackboneWeightsError` lists what is wrong.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision import models

BACKBONES: tuple[str, ...] = ("tiny", "resnet18", "mobilenet_v3_small", "inception_v3")
STRIDES: tuple[int, ...] = (8, 16, 32)
INCEPTION_MIN_SIDE = 75  # torchvision's documented minimum input size for inception_v3
_IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))  # mean, std


class BackboneWeightsError(RuntimeError):
    """A local weight file does not fit the requested backbone."""


class Backbone(nn.Module):
    """Wraps a feature extractor ``body`` whose parameter names equal torchvision's.

    ``forward``: [B, 1, H, W] frame in about [0, 1] -> [B, out_channels, h, w].
    """

    def __init__(
        self,
        name: str,
        body: nn.Module,
        out_channels: int,
        stride: int,
        in_channels: int = 3,
        norm: tuple[tuple[float, ...], tuple[float, ...]] | None = None,
        min_side: int = 1,
        ignored_keys: frozenset[str] = frozenset(),
    ) -> None:
        super().__init__()
        self.name = name
        self.body = body
        self.out_channels = out_channels
        self.stride = stride
        self.in_channels = in_channels
        self.min_side = min_side
        self.ignored_keys = ignored_keys  # keys of the full torchvision model that the cut body lacks
        if norm is None:
            norm = ((0.0,) * in_channels, (1.0,) * in_channels)
        self.register_buffer("mean", torch.tensor(norm[0]).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(norm[1]).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[1] != 1:
            raise ValueError(f"{self.name} backbone expects [B, 1, H, W], got {tuple(x.shape)}")
        h, w = x.shape[-2:]
        if min(h, w) < self.min_side:  # e.g. inception_v3 cannot go below 75 px
            k = self.min_side / min(h, w)
            x = F.interpolate(x, size=(round(h * k), round(w * k)), mode="bilinear", align_corners=False)
        if self.in_channels != 1:
            x = x.expand(-1, self.in_channels, -1, -1)
        return self.body((x - self.mean) / self.std)

    def load_weights(self, path: str | Path) -> None:
        """Load a local state_dict (this body's, or the full torchvision model's); see the module doc."""
        path = Path(path)
        if not path.is_file():
            raise BackboneWeightsError(f"{self.name}: weight file {path} does not exist")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # pickle / zip errors: say which file and why
            raise BackboneWeightsError(f"{self.name}: cannot read {path}: {exc}") from exc
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]
        if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
            raise BackboneWeightsError(f"{self.name}: {path} does not hold a state_dict of tensors")
        state = {_strip(k): v for k, v in state.items()}
        own = self.body.state_dict()
        missing = [k for k in own if k not in state]
        unexpected = [k for k in state if k not in own and k not in self.ignored_keys]
        shapes = [
            f"{k}: file {tuple(state[k].shape)} vs model {tuple(v.shape)}"
            for k, v in own.items()
            if k in state and state[k].shape != v.shape
        ]
        if missing or unexpected or shapes:
            lines = [f"{self.name} (stride {self.stride}): {path} does not match"]
            problems = (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes))
            for label, items in problems:
                if items:
                    lines.append(f"  {len(items)} {label}, e.g. {items[:5]}")
            raise BackboneWeightsError("\n".join(lines))
        self.body.load_state_dict({k: state[k] for k in own}, strict=True)


def _strip(key: str) -> str:
    for prefix in ("module.", "body."):
        key = key.removeprefix(prefix)
    return key


def _ignored(full: nn.Module, body: nn.Module) -> frozenset[str]:
    return frozenset(full.state_dict()) - frozenset(body.state_dict())


def _check_stride(name: str, stride: int, allowed: tuple[int, ...]) -> None:
    if stride not in allowed:
        raise ValueError(f"{name}: stride must be one of {allowed}, got {stride}")


def _tiny(stride: int) -> Backbone:
    """Conv-BN-ReLU stages on 1 input channel: cheap enough for unit tests and CI training."""
    _check_stride("tiny", stride, (4, 8, 16))
    # (out channels, stride) per stage; the product of the strides is the backbone stride
    stages = {
        4: ((16, 2), (32, 2), (32, 1), (32, 1)),
        8: ((16, 2), (32, 2), (64, 2), (64, 1)),
        16: ((16, 2), (32, 2), (64, 2), (64, 2)),
    }[stride]
    layers: list[nn.Module] = []
    c_in = 1
    for c_out, s in stages:
        layers += [nn.Conv2d(c_in, c_out, 3, s, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
        c_in = c_out
    return Backbone("tiny", nn.Sequential(*layers), c_in, stride, in_channels=1)


def _resnet18(stride: int) -> Backbone:
    _check_stride("resnet18", stride, STRIDES)
    full = models.resnet18(weights=None)
    names = ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"]
    n_layers = {8: 6, 16: 7, 32: 8}[stride]
    body = nn.Sequential(OrderedDict((n, getattr(full, n)) for n in names[:n_layers]))
    channels = {8: 128, 16: 256, 32: 512}[stride]
    return Backbone("resnet18", body, channels, stride, norm=_IMAGENET, ignored_keys=_ignored(full, body))


def _mobilenet_v3_small(stride: int) -> Backbone:
    _check_stride("mobilenet_v3_small", stride, STRIDES)
    full = models.mobilenet_v3_small(weights=None)
    n_blocks = {8: 4, 16: 9, 32: len(full.features)}[stride]
    body = nn.Sequential(OrderedDict([("features", full.features[:n_blocks])]))
    channels = {8: 24, 16: 48, 32: 576}[stride]
    return Backbone(
        "mobilenet_v3_small",
        body,
        channels,
        stride,
        norm=_IMAGENET,
        ignored_keys=_ignored(full, body),
    )


def _inception_v3(stride: int) -> Backbone:
    """InceptionV3 with PyTorch default init (``init_weights=False``, sacmf.md section 6.1).

    The truncated-normal init of ``init_weights=True`` gave logits ~1e12 and erratic latency with
    untouched BatchNorm statistics. Input is scaled to [-1, 1] as the Google weights expect (what
    ``transform_input`` does inside torchvision's own forward, which is bypassed here). The
    ``AuxLogits`` keys of a weight file are ignored.
    """
    _check_stride("inception_v3", stride, STRIDES)
    full = models.inception_v3(weights=None, aux_logits=True, init_weights=False)
    names = [
        "Conv2d_1a_3x3",
        "Conv2d_2a_3x3",
        "Conv2d_2b_3x3",
        "maxpool1",
        "Conv2d_3b_1x1",
        "Conv2d_4a_3x3",
        "maxpool2",
        "Mixed_5b",
        "Mixed_5c",
        "Mixed_5d",
        "Mixed_6a",
        "Mixed_6b",
        "Mixed_6c",
        "Mixed_6d",
        "Mixed_6e",
        "Mixed_7a",
        "Mixed_7b",
        "Mixed_7c",
    ]
    last = {8: "Mixed_5d", 16: "Mixed_6e", 32: "Mixed_7c"}[stride]
    body = nn.Sequential(OrderedDict((n, getattr(full, n)) for n in names[: names.index(last) + 1]))
    channels = {8: 288, 16: 768, 32: 2048}[stride]
    return Backbone(
        "inception_v3",
        body,
        channels,
        stride,
        norm=((0.5,) * 3, (0.5,) * 3),
        min_side=INCEPTION_MIN_SIDE,
        ignored_keys=_ignored(full, body),
    )


_BUILDERS: dict[str, Callable[[int], Backbone]] = {
    "tiny": _tiny,
    "resnet18": _resnet18,
    "mobilenet_v3_small": _mobilenet_v3_small,
    "inception_v3": _inception_v3,
}


def build_backbone(name: str, stride: int = 8, weights: str | Path | None = None) -> Backbone:
    """Backbone ``name`` cut at ``stride``; ``weights`` is an optional local state_dict file."""
    if name not in _BUILDERS:
        raise ValueError(f"unknown backbone {name!r}; choose one of {BACKBONES}")
    backbone = _BUILDERS[name](stride)
    if weights is not None:
        backbone.load_weights(weights)
    return backbone


@torch.no_grad()
def feature_shape(backbone: Backbone, frame_size: int) -> tuple[int, int, int]:
    """(C, h, w) for a square frame, by a dry run: exact for every architecture's padding rules."""
    was_training = backbone.training
    backbone.eval()
    out = backbone(torch.zeros(1, 1, frame_size, frame_size))
    backbone.train(was_training)
    return int(out.shape[1]), int(out.shape[2]), int(out.shape[3])
