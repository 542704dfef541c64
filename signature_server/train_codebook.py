"""Trains the colour-texture codebook: k-means (FAISS) over descriptors of real photos.

    python -m signature_server.train_codebook --out models/colour-texture-bow/2 --nearest 20 --sigma 0.2 --units 40

Descriptors come from the bundled photos named in TRAINING_PHOTOS, whole and as random crops at
several scales (mirrored half of the time), described exactly as the server describes a crop (with
the parameters of the highest version on disk). The result is three files in a version folder
(default: the one after the highest on disk): codebook.npz (uint8 centres / 255), config.json (the
version's own settings: its word assignment, --nearest/--sigma/--units/--max-signature-bytes, see
signature_server/bow.py) and provenance.json (sources, parameters, library versions, checksums, the
command, the fingerprint its signatures carry). The photos the benchmark searches are left out.

A new codebook is a new vocabulary: serve it as a new version (LoadModel), and rebuild the indexes
that should use it; until then they refuse its signatures (the codebook's fingerprint differs).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import platform
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import faiss
import numpy as np
from tqdm import tqdm

from common.model_repository import versions_on_disk
from common.photos import load_photo
from kernels import select_kernels, spec
from signature_server.bow import SIGNATURE_BYTES, Assignment, BowExtractor, BowSpec, Codebook

MODEL_DIR = Path(__file__).resolve().parent.parent / "models" / "colour-texture-bow"
# bench/signature.py searches tiles of china.jpg, flower.jpg, hubble_deep_field and retina: not here.
TRAINING_PHOTOS = (
    "astronaut",
    "chelsea",
    "coffee",
    "rocket",
    "motorcycle_left",
    "motorcycle_right",
    "immunohistochemistry",
    "colorwheel",
    "logo",
)


def sample_crops(image: np.ndarray, count: int, rng: np.random.Generator) -> list[np.ndarray]:
    height, width = image.shape[:2]
    crops = [image]
    for _ in range(count):
        side = rng.uniform(0.2, 0.8)
        h, w = max(16, int(height * side * rng.uniform(0.7, 1.3))), max(16, int(width * side))
        h, w = min(h, height), min(w, width)
        y, x = int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1))
        crop = image[y : y + h, x : x + w]
        crops.append(crop[:, ::-1] if rng.random() < 0.5 else crop)
    return crops


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    on_disk = versions_on_disk(MODEL_DIR)
    parser.add_argument("--out", type=Path, default=MODEL_DIR / str(int(on_disk[-1]) + 1 if on_disk else 1))
    parser.add_argument("--centres", type=int, default=5000)
    parser.add_argument("--nearest", type=int, default=20, help="words per descriptor (1 = hard assignment)")
    parser.add_argument("--sigma", type=float, default=0.2, help="width of the soft weights (Hellinger distance)")
    parser.add_argument("--units", type=int, default=40, help="integer units each descriptor shares out")
    parser.add_argument("--max-signature-bytes", type=int, default=SIGNATURE_BYTES)
    parser.add_argument("--crops-per-photo", type=int, default=60)
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--photos", nargs="+", default=list(TRAINING_PHOTOS))
    args = parser.parse_args(argv)

    bow_spec = BowSpec.load(MODEL_DIR)
    assignment = Assignment(args.nearest, args.sigma if args.nearest > 1 else 0.0, args.units, args.max_signature_bytes)
    assignment.check("train_codebook", args.centres, bow_spec.max_keypoints)
    kernels = select_kernels("auto")
    rng = np.random.default_rng(args.seed)
    # Describing needs no codebook; a placeholder of the right width (hard-assigned) satisfies the extractor.
    extractor = BowExtractor(
        dataclasses.replace(bow_spec, assignment=Assignment()),
        Codebook(np.zeros((1, spec.DIMENSION), np.float32)),
        kernels,
    )
    sources, descriptors, crops = [], [], []
    for name in args.photos:
        photo = load_photo(name)
        sources.append({"photo": name, "sha256": hashlib.sha256(photo.tobytes()).hexdigest()})
        crops += [(name, crop) for crop in sample_crops(photo, args.crops_per_photo, rng)]
    for _, crop in tqdm(crops, desc="describing", unit="crop"):
        descriptors.append(extractor.describe(crop).descriptors)
    data = np.ascontiguousarray(np.concatenate(descriptors), np.float32)
    print(f"{len(data)} descriptors from {len(crops)} crops of {len(args.photos)} photos", file=sys.stderr)

    started = time.time()
    kmeans = faiss.Kmeans(
        spec.DIMENSION,
        args.centres,
        niter=args.iterations,
        seed=args.seed,
        verbose=True,
        max_points_per_centroid=100_000,
    )
    kmeans.train(data)
    if kmeans.centroids is None or kmeans.obj is None:
        raise RuntimeError("faiss k-means returned no centres")
    codebook = Codebook(Codebook.quantise(kmeans.centroids).astype(np.float32) / np.float32(255), None, assignment)

    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "codebook.npz"
    codebook.save(path)
    version_config = {"assignment": dataclasses.asdict(assignment)}
    (args.out / "config.json").write_text(json.dumps(version_config, indent=2) + "\n")
    provenance = {
        "artefact": f"{bow_spec.name} codebook, version {args.out.name}",
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": "python -m signature_server.train_codebook " + " ".join(argv if argv is not None else sys.argv[1:]),
        "descriptor_settings_from": f"{bow_spec.name} version {bow_spec.version}",
        "centres": args.centres,
        "dimension": spec.DIMENSION,
        "storage": "uint8, value = stored / 255",
        "algorithm": f"faiss.Kmeans (faiss {faiss.__version__}), {args.iterations} iterations, seed {args.seed}",
        "objective": float(kmeans.obj[-1]),
        "training_seconds": round(time.time() - started, 1),
        "descriptors": len(data),
        "crops": len(crops),
        "crops_per_photo": args.crops_per_photo,
        "sources": sources,
        "kernels": kernels.name,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "assignment": dataclasses.asdict(assignment),
        "fingerprint": codebook.fingerprint,
        "centres_fingerprint": Codebook(codebook.centres).fingerprint,
        "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        "config": json.loads((MODEL_DIR / "config.json").read_text()) | version_config,
    }
    (args.out / "provenance.json").write_text(json.dumps(provenance, indent=2) + "\n")
    print(json.dumps({"out": str(path), "descriptors": len(data), "fingerprint": codebook.fingerprint}))


if __name__ == "__main__":
    main()
