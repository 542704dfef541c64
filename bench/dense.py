"""Dense databases at the paper's sizes: the approximate index with exact re-rank against exact Flat.

    .venv/bin/python bench/dense.py [--sizes 100000,1000000] [--queries 200] [--flat-queries 50]

Vectors derived from real signatures (cached under data/bench/dense-v1/, gitignored):

1. Real signatures: the deep descriptor (EfficientNet-Lite0 GeM, 1280-d, in process) of every
   catalogue and distractor image of the multi-product scenes set (bench/scene_data.py, built on
   first use) and of the 3x3 tiles of the bundled photos, each as it is, mirrored, and as a random
   70-90% crop: about 4,600 real 1280-d unit vectors.
2. Derived vectors: the real signatures are clustered (k-means, ~30 per cluster); each derived
   vector is a random convex mix (Dirichlet(1) weights) of 2 or 3 real signatures of one cluster
   (the cluster drawn in proportion to its size), plus Gaussian noise scaled per dimension by the
   real signatures' own spread (NOISE of it), re-normalised. Mixes stay on the real signatures'
   manifold (their principal directions, their cluster structure: the nearest neighbours of an
   item are items of the same kind of image) while giving N distinct vectors. The N vectors of a
   size are the first N of the largest size (chunks from seeded generators), so 100k is a prefix
   of 1M. Queries: derived the same way from their own generator, never inserted (held out).

Per size, in one run: the approximate database (index_server.dense.DenseDatabase with its default
tuning: exact Flat below `exact_below`, then PCA + IVF-PQ codes + exact re-rank of the candidates
from the float32 rows kept on disk), built by adding every vector in batches as a catalogue grows
(its own background builds as it crosses the threshold and grows 4x; the clock stops when the last
build is swapped in); then exact Flat (FAISS IndexFlatIP, the database's exact mode) on the same
vectors. For each: p50/p99 ms of one query at a time (single caller; FAISS on the machine's
cores), recall@10 (share of the exact top 10 found, exact = brute force over the same rows),
bytes per item in memory (the database's own accounting: index codes, ids, dicts, per-row arrays;
and the process's anonymous RSS growth, which also counts allocator slack), build time. With
--filter-shares, the same for filtered searches (groups tagged so that a share passes): recall
against brute force over the passing items. Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / "data" / "bench" / "dense-v1"
MODELS = ROOT / "models"
DIMENSION = 1280
NOISE = 0.35  # of the real signatures' per-dimension standard deviation
CHUNK = 50_000  # derived vectors per seeded generator (so sizes are prefixes of each other)
SEED = 14


# -- real signatures --------------------------------------------------------------------------------


def real_images(rng: np.random.Generator) -> list[np.ndarray]:
    """Every catalogue and distractor image of the scenes set, and 3x3 tiles of the bundled photos,
    each as it is, mirrored and as a random 70-90% crop: (H, W, 3) uint8 RGB."""
    import cv2

    from bench import scene_data
    from common.photos import SKIMAGE_PHOTOS, SKLEARN_PHOTOS, load_photo

    manifest = scene_data.load(scene_data.build())
    paths = [image.path for product in manifest.products for image in product.images]
    paths += [distractor.path for distractor in manifest.distractors]
    originals = []
    for relative in paths:
        image = cv2.imread(str(manifest.file(relative)))
        assert image is not None, f"{relative} is not readable: rebuild the scenes set"
        originals.append(cv2.cvtColor(image, cv2.COLOR_BGR2RGB))
    for name in SKIMAGE_PHOTOS + SKLEARN_PHOTOS:
        photo = load_photo(name)
        height, width = photo.shape[:2]
        originals += [
            photo[r * height // 3 : (r + 1) * height // 3, c * width // 3 : (c + 1) * width // 3]
            for r in range(3)
            for c in range(3)
        ]
    images = []
    for image in originals:
        height, width = image.shape[:2]
        share = rng.uniform(0.7, 0.9)
        h, w = max(8, int(height * share)), max(8, int(width * share))
        y, x = int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1))
        images += [image, np.ascontiguousarray(image[:, ::-1]), np.ascontiguousarray(image[y : y + h, x : x + w])]
    return images


def real_signatures() -> np.ndarray:
    """(S, 1280) float32 unit deep signatures of real images (computed once, then cached)."""
    path = CACHE / "real.npy"
    if path.exists():
        return np.load(path)
    from signature_server.deep import DeepDescriptor, DeepSpec

    images = real_images(np.random.default_rng(SEED))
    descriptor = DeepDescriptor(DeepSpec.load(MODELS / "efficientnet-lite0"))
    start = time.perf_counter()
    signatures = np.concatenate([descriptor.compute(images[i : i + 64]) for i in range(0, len(images), 64)])
    print(f"{len(images)} real signatures in {time.perf_counter() - start:.0f} s", flush=True)
    CACHE.mkdir(parents=True, exist_ok=True)
    np.save(path, signatures.astype(np.float32))
    return np.load(path)


# -- derived vectors --------------------------------------------------------------------------------


def _mixes(real: np.ndarray, members: np.ndarray, starts: np.ndarray, sizes: np.ndarray, count: int, seed: int):
    """(count, D) float32 unit vectors, each a convex mix of 2 or 3 real signatures of one cluster
    plus noise (see the module docstring); `members` are the real rows sorted by cluster."""
    rng = np.random.default_rng(seed)
    spread = real.std(axis=0)
    cluster = rng.choice(len(sizes), size=count, p=sizes / sizes.sum())
    weights = rng.dirichlet(np.ones(3), size=count).astype(np.float32)
    weights[:, 2] *= rng.integers(0, 2, size=count)  # half of the mixes are of 2 signatures
    weights /= weights.sum(axis=1, keepdims=True)
    out = NOISE * spread * rng.standard_normal((count, real.shape[1]), dtype=np.float32)
    for slot in range(3):
        picks = members[starts[cluster] + (rng.random(count) * sizes[cluster]).astype(np.int64)]
        out += weights[:, slot, None] * real[picks]
    out /= np.linalg.norm(out, axis=1, keepdims=True)
    return out


def derived_vectors(real: np.ndarray, count: int, queries: int) -> tuple[np.ndarray, np.ndarray]:
    """(>= count, D) float32 derived vectors (a memmap of the cache) and (queries, D) held-out ones."""
    import faiss

    path, query_path = CACHE / "derived.npy", CACHE / "queries.npy"
    if path.exists() and query_path.exists():
        vectors, held_out = np.load(path, mmap_mode="r"), np.load(query_path)
        if len(vectors) >= count and len(held_out) >= queries:
            return vectors, held_out[:queries]
    start = time.perf_counter()
    kmeans = faiss.Kmeans(real.shape[1], max(1, len(real) // 30), niter=20, seed=SEED, spherical=True)
    kmeans.train(real)
    _, assigned = kmeans.index.search(real, 1)
    members = np.argsort(assigned[:, 0], kind="stable")
    sizes = np.bincount(assigned[:, 0], minlength=kmeans.k).astype(np.int64)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    rows = max(count, CHUNK)
    out = np.lib.format.open_memmap(path.with_suffix(".tmp.npy"), "w+", np.float32, (rows, real.shape[1]))
    for number, first in enumerate(range(0, rows, CHUNK)):
        size = min(CHUNK, rows - first)
        out[first : first + size] = _mixes(real, members, starts, sizes, size, SEED * 1_000_003 + number)
    out.flush()
    del out
    path.with_suffix(".tmp.npy").rename(path)
    np.save(query_path, _mixes(real, members, starts, sizes, max(queries, 1000), SEED - 1))
    print(f"{rows} derived vectors in {time.perf_counter() - start:.0f} s", flush=True)
    return np.load(path, mmap_mode="r"), np.load(query_path)[:queries]


def exact_top(queries: np.ndarray, vectors: np.ndarray, k: int, rows: np.ndarray | None = None) -> np.ndarray:
    """(Q, k) int64 indices of the k best inner products of each query among `vectors` (or among
    its `rows`), by blocks (brute force, the reference)."""
    index = np.arange(len(vectors)) if rows is None else rows
    best_scores = np.full((len(queries), k), -np.inf, np.float32)
    best = np.full((len(queries), k), -1, np.int64)
    for start in range(0, len(index), CHUNK):
        block = index[start : start + CHUNK]
        scores = queries @ np.asarray(vectors[block[0] : block[-1] + 1] if rows is None else vectors[block]).T
        scores = np.concatenate([best_scores, scores], axis=1)
        labels = np.concatenate([best, np.broadcast_to(block, (len(queries), len(block)))], axis=1)
        top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        best_scores = np.take_along_axis(scores, top, axis=1)
        best = np.take_along_axis(labels, top, axis=1)
    return best


# -- measuring ------------------------------------------------------------------------------------


def rss_anon() -> int:
    """Anonymous resident bytes of this process (heap: the file-backed rows on disk are not in it),
    after the free heap pages are given back to the OS (glibc's malloc_trim)."""
    import ctypes

    ctypes.CDLL("libc.so.6").malloc_trim(0)
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    return 0


def label(size: int) -> str:
    return f"{size // 1_000_000}m" if size % 1_000_000 == 0 else f"{size // 1000}k"


def timed_searches(search, queries: np.ndarray) -> tuple[list[list[str]], np.ndarray]:
    """Each query searched alone (after 3 untimed) -> (its hits' ids, (Q,) ms)."""
    for query in queries[:3]:
        search(query)
    found, times = [], []
    for query in queries:
        start = time.perf_counter()
        hits = search(query)
        times.append(1000 * (time.perf_counter() - start))
        found.append([hit.item_id for hit in hits])
    return found, np.array(times)


def recall(found: list[list[str]], truth: np.ndarray) -> float:
    return float(np.mean([len({f"img{t:07d}" for t in row} & set(ids)) / len(row) for ids, row in zip(found, truth)]))


def build(database, vectors: np.ndarray, size: int, batch: int) -> float:
    """Adds the first `size` vectors in batches, as a catalogue grows (ids img0000000..., groups of
    3 images, a path in the metadata), waiting for each build it starts -> seconds in all."""
    start = time.perf_counter()
    for first in range(0, size, batch):
        last = min(size, first + batch)
        database.add_batch(
            [f"img{i:07d}" for i in range(first, last)],
            np.asarray(vectors[first:last]),
            [{"path": f"images/p{i // 3}/{i % 3}.jpg"} for i in range(first, last)],
            [f"p{i // 3}" for i in range(first, last)],
        )
        if database.building:
            database.wait_for_build()
    return time.perf_counter() - start


def measure(size: int, vectors: np.ndarray, queries: np.ndarray, args: argparse.Namespace) -> dict[str, object]:
    name = label(size)
    start = time.perf_counter()
    truth = exact_top(queries, vectors[:size], 10)
    print(f"[{name}] exact top 10 of {len(queries)} queries by brute force in {time.perf_counter() - start:.0f} s")
    figures = approximate_figures(size, vectors, queries, truth, args)
    gc.collect()
    if args.flat_queries:
        figures.update(flat_figures(size, vectors, queries[: args.flat_queries], truth[: args.flat_queries], args))
        gc.collect()
    return figures


def approximate_figures(
    size: int, vectors: np.ndarray, queries: np.ndarray, truth: np.ndarray, args: argparse.Namespace
) -> dict[str, object]:
    """The database as it turns approximate by itself (default tuning), then filtered searches."""
    from index_server.dense import DenseDatabase
    from index_server.domain import Filter, ProductAttributes

    name = label(size)
    figures: dict[str, object] = {}
    gc.collect()
    before = rss_anon()
    database = DenseDatabase(DIMENSION)
    seconds = build(database, vectors, size, args.batch)
    gc.collect()
    figures[f"build_s_{name}"] = round(seconds, 1)
    figures[f"bytes_per_item_{name}"] = round(database.memory_bytes / size)
    figures[f"rss_bytes_per_item_{name}"] = round((rss_anon() - before) / size)
    figures[f"index_type_{name}"] = database.index_type
    found, times = timed_searches(lambda q: database.search(q, 10), queries)
    figures[f"p50_ms_{name}"] = round(float(np.percentile(times, 50)), 2)
    figures[f"p99_ms_{name}"] = round(float(np.percentile(times, 99)), 2)
    figures[f"recall_at_10_{name}"] = round(recall(found, truth), 4)
    shown = ", ".join(f"{k.rsplit('_', 1)[0]} {v}" for k, v in figures.items() if "index_type" not in k)
    print(f"[{name}] approximate: {database.index_type}; {shown}", flush=True)

    groups = np.random.default_rng(SEED).permutation((size + 2) // 3)
    for share in args.filter_shares:
        chosen = groups[: max(1, int(share * len(groups)))]
        tag = f"share{share}"
        for group in chosen.tolist():
            database.set_attributes(f"p{group}", ProductAttributes(tags=frozenset({tag})))
        passing = np.flatnonzero(np.isin(np.arange(size) // 3, chosen))
        filtered_truth = exact_top(queries, vectors, 10, passing)
        where = Filter(all_tags=frozenset({tag}))
        found, times = timed_searches(lambda q, where=where: database.search(q, 10, filter=where), queries)
        p50 = round(float(np.percentile(times, 50)), 2)
        hit_rate = round(recall(found, filtered_truth), 4)
        percent = f"{share * 100:g}pct"
        figures[f"filtered_{percent}_p50_ms_{name}"] = p50
        figures[f"filtered_{percent}_recall_at_10_{name}"] = hit_rate
        print(f"[{name}] filter keeping {share:.0%} ({len(passing)} items): p50 {p50} ms, recall@10 {hit_rate}")
    return figures


def flat_figures(
    size: int, vectors: np.ndarray, queries: np.ndarray, truth: np.ndarray, args: argparse.Namespace
) -> dict[str, object]:
    """The same vectors in an exact database (FAISS IndexFlatIP: factory "Flat")."""
    from index_server.dense import DenseDatabase

    name = label(size)
    before = rss_anon()
    flat = DenseDatabase(DIMENSION, factory="Flat")
    seconds = build(flat, vectors, size, args.batch)
    gc.collect()
    found, times = timed_searches(lambda q: flat.search(q, 10), queries)
    figures: dict[str, object] = {
        f"flat_build_s_{name}": round(seconds, 1),
        f"flat_bytes_per_item_{name}": round(flat.memory_bytes / size),
        f"flat_rss_bytes_per_item_{name}": round((rss_anon() - before) / size),
        f"flat_p50_ms_{name}": round(float(np.percentile(times, 50)), 2),
        f"flat_p99_ms_{name}": round(float(np.percentile(times, 99)), 2),
        f"flat_recall_at_10_{name}": round(recall(found, truth), 4),
    }
    shown = ", ".join(f"{k.rsplit('_', 1)[0]} {v}" for k, v in figures.items())
    print(f"[{name}] exact: {shown}", flush=True)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--sizes", default="100000,1000000", help="comma-separated database sizes")
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--flat-queries", type=int, default=50, help="queries timed on exact Flat (0: skip it)")
    parser.add_argument("--filter-shares", default="0.01,0.1", help="shares of items a filter keeps ('' : none)")
    parser.add_argument("--batch", type=int, default=CHUNK, help="items per add_batch while building")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",") if s]
    args.filter_shares = [float(s) for s in args.filter_shares.split(",") if s]
    real = real_signatures()
    vectors, queries = derived_vectors(real, max(sizes), args.queries)
    print(f"{len(real)} real signatures; {max(sizes)} derived vectors; {len(queries)} held-out queries", flush=True)
    figures: dict[str, object] = {"real_signatures": len(real), "queries": len(queries)}
    for size in sizes:
        figures.update(measure(size, vectors, queries, args))
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
