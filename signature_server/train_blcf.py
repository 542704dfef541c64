"""Trains a BLCF vocabulary: PCA-whitening and k-means (FAISS) over the network's cell features of real photos.

    python -m signature_server.train_blcf --out models/blcf/2 --words 25000 --dims 128 --crops-per-photo 200

Cell features come from the bundled photos named in train_codebook.TRAINING_PHOTOS (the photos the
benchmarks search are left out), whole and as random crops at several scales (mirrored half of the
time), each described as the server describes an image (signature_server/blcf.py: resized to the
long side, the feature tensor's cells L2-normalised). A PCA with whitening (faiss.PCAMatrix,
eigen power --eigen-power) maps them to --dims dimensions, where they are L2-normalised again and
clustered into --words centres (faiss.Kmeans, --iterations, fixed seed).

The result is three files in a version folder (default: the one after the highest on disk):
vocabulary.npz (mean, projection, float16 centres), config.json (the representation it was trained
with: network and its version, tensor, stride, long side, multiple; each a flag here, the model's
config.json by default) and provenance.json (sources and checksums, parameters, library versions,
the objective, seconds, the command, the fingerprint its signatures carry).

A new vocabulary is a new set of words: serve it as a new version (LoadModel), and rebuild the
indexes that should use it; until then they refuse its signatures (the fingerprint differs).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import onnxruntime as ort
from tqdm import tqdm

from common.model_repository import versions_on_disk
from common.photos import load_photo
from signature_server.blcf import BlcfSpec, FeatureNetwork, Vocabulary, cells
from signature_server.train_codebook import TRAINING_PHOTOS, sample_crops

MODEL_DIR = Path(__file__).resolve().parent.parent / "models" / "blcf"
# Training runs on a GPU when one starts; TensorRT is left out (every crop is another input shape).
PROVIDERS: tuple[tuple[str, dict[str, Any]], ...] = (("CUDAExecutionProvider", {}), ("CPUExecutionProvider", {}))


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    on_disk = versions_on_disk(MODEL_DIR)
    parser.add_argument("--out", type=Path, default=MODEL_DIR / str(int(on_disk[-1]) + 1 if on_disk else 1))
    parser.add_argument("--words", type=int, default=25000, help="vocabulary size (k-means centres)")
    parser.add_argument("--dims", type=int, default=128, help="dimensions after PCA-whitening")
    parser.add_argument("--eigen-power", type=float, default=-0.5, help="PCA eigenvalue power (-0.5 = whitening)")
    parser.add_argument("--crops-per-photo", type=int, default=60)
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--photos", nargs="+", default=list(TRAINING_PHOTOS))
    parser.add_argument("--network", help="network model folder (default: the model's config.json)")
    parser.add_argument("--network-version", help="its version (default: the highest on disk)")
    parser.add_argument("--tensor", help="feature tensor of the graph (default: the model's config.json)")
    parser.add_argument("--stride", type=int, help="the tensor's stride")
    parser.add_argument("--long-side", type=int, help="the described image's longer side")
    parser.add_argument("--multiple", type=int, help="both input sides are multiples of this")
    parser.add_argument("--intra-op-threads", type=int, default=2)
    args = parser.parse_args(argv)
    if args.words < 1 or args.dims < 1 or args.crops_per_photo < 0 or args.iterations < 1:
        parser.error("--words, --dims and --iterations must be at least 1, --crops-per-photo at least 0")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    settings = json.loads((MODEL_DIR / "config.json").read_text())
    overrides = {
        "network": args.network,
        "network_version": args.network_version,
        "tensor": args.tensor,
        "stride": args.stride,
        "long_side": args.long_side,
        "multiple": args.multiple,
    }
    settings.update({key: value for key, value in overrides.items() if value is not None})
    blcf_spec = BlcfSpec.from_settings(MODEL_DIR.name, args.out.name, args.out, settings, MODEL_DIR.parent)
    network = FeatureNetwork(blcf_spec, PROVIDERS, args.intra_op_threads)

    rng = np.random.default_rng(args.seed)
    sources, crops = [], []
    for name in args.photos:
        photo = load_photo(name)
        sources.append({"photo": name, "sha256": hashlib.sha256(photo.tobytes()).hexdigest()})
        crops += sample_crops(photo, args.crops_per_photo, rng)
    features = []
    for crop in tqdm(crops, desc="describing", unit="crop"):
        (feature_map,) = network.describe([crop])
        x = cells(feature_map)
        features.append(x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), np.float32(1e-12)))
    data = np.ascontiguousarray(np.concatenate(features), np.float32)
    channels = data.shape[1]
    print(
        f"{len(data)} cells ({channels} channels) from {len(crops)} crops of {len(args.photos)} photos", file=sys.stderr
    )
    if args.dims > channels:
        raise SystemExit(f"--dims {args.dims} is above the tensor's {channels} channels")
    if len(data) < args.words:
        raise SystemExit(f"{len(data)} cells cannot make {args.words} words: add --crops-per-photo or lower --words")

    started = time.time()
    pca = faiss.PCAMatrix(channels, args.dims, args.eigen_power)
    pca.train(data)
    mean = faiss.vector_to_array(pca.mean).astype(np.float32)
    projection = faiss.vector_to_array(pca.A).reshape(pca.d_out, pca.d_in)[: args.dims].astype(np.float32)
    # The vocabulary's own projection (Vocabulary.project) on the training cells: what k-means clusters.
    placeholder = Vocabulary(mean, projection, np.zeros((1, args.dims), np.float16), blcf_spec.tensor, blcf_spec.stride)
    projected = placeholder.project(data)
    kmeans = faiss.Kmeans(args.dims, args.words, niter=args.iterations, seed=args.seed, verbose=True)
    kmeans.train(projected)
    if kmeans.centroids is None or kmeans.obj is None:
        raise RuntimeError("faiss k-means returned no centres")
    vocabulary = Vocabulary(mean, projection, kmeans.centroids.astype(np.float16), blcf_spec.tensor, blcf_spec.stride)
    seconds = round(time.time() - started, 1)

    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "vocabulary.npz"
    vocabulary.save(path)
    version_config = blcf_spec.settings()
    (args.out / "config.json").write_text(json.dumps(version_config, indent=2) + "\n")
    provenance = {
        "artefact": f"{blcf_spec.name} vocabulary, version {args.out.name}",
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": "python -m signature_server.train_blcf " + " ".join(argv if argv is not None else sys.argv[1:]),
        "network": {
            "name": blcf_spec.network.name,
            "version": blcf_spec.network.version,
            "file": blcf_spec.network.model_path.name,
            "sha256": sha256(blcf_spec.network.model_path),
        },
        "parameters": {
            "words": args.words,
            "dims": args.dims,
            "eigen_power": args.eigen_power,
            "iterations": args.iterations,
            "seed": args.seed,
            "crops_per_photo": args.crops_per_photo,
            "crops": len(crops),
            "cells": len(data),
            "channels": channels,
            **version_config,
        },
        "storage": "mean (C,) float32, projection (d, C) float32, centres (V, d) float16",
        "algorithm": (
            f"faiss.PCAMatrix({channels}, {args.dims}, eigen_power={args.eigen_power}) then "
            f"faiss.Kmeans ({args.iterations} iterations, seed {args.seed}) on the projected, L2-normalised cells"
        ),
        "objective": float(kmeans.obj[-1]),
        "training_seconds": seconds,
        "sources": sources,
        "libraries": {
            "python": platform.python_version(),
            "numpy": np.__version__,
            "faiss": faiss.__version__,
            "onnxruntime": ort.__version__,
        },
        "execution_provider": network.provider,
        "fingerprint": vocabulary.fingerprint,
        "sha256": sha256(path),
        "config": settings | version_config,
    }
    (args.out / "provenance.json").write_text(json.dumps(provenance, indent=2) + "\n")
    print(
        json.dumps({"out": str(path), "cells": len(data), "words": args.words, "fingerprint": vocabulary.fingerprint})
    )


if __name__ == "__main__":
    main()
