"""Searches per second of one database at 1, 2 and 4 threads: readers share the database's lock.

    .venv/bin/python bench/concurrent_search.py [--bow-items 200000] [--dense-items 100000] [--seconds 2.5]

Two in-process databases, no gRPC: a bag-of-words BowIndex of --bow-items items resampled from real
crops through the real codebook (bench/index.py's generator, the background merge settled), and a
DenseDatabase of --dense-items random 256-d unit vectors in a FAISS Flat index. For each, T threads
(T = 1, 2, 4) run exact top-10 searches of fresh queries for --seconds; the figure is all threads'
searches per second. In the same run, "serialised" repeats it with one lock held around each whole
search, as the single database lock did before searches took the read side of a reader-writer
lock. More threads than cores cannot add throughput; parallel FAISS Flat searches share the memory
bandwidth that one already nearly fills. Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.index import MODELS, Resampler, real_bags
from common.bow_codec import BagOfWords
from index_server.dense import DenseDatabase
from index_server.inverted import BowIndex
from kernels import select_kernels
from signature_server.bow import BowExtractor, BowSpec

THREADS = (1, 2, 4)
TOP_K = 10
DIMENSION = 256


def searches_per_s(
    search: Callable[[int], object], queries: int, threads: int, seconds: float, serialised: bool
) -> float:
    """All threads' searches per second over `seconds`; serialised: one lock around each search."""
    one_at_a_time = threading.Lock() if serialised else contextlib.nullcontext()
    start = threading.Barrier(threads + 1)
    counts = [0] * threads
    deadline = [0.0]

    def worker(number: int) -> None:
        query = number * 7919
        start.wait()
        while time.perf_counter() < deadline[0]:
            with one_at_a_time:
                search(query % queries)
            counts[number] += 1
            query += 1

    workers = [threading.Thread(target=worker, args=(n,)) for n in range(threads)]
    for thread in workers:
        thread.start()
    began = time.perf_counter()
    deadline[0] = began + seconds
    start.wait()
    for thread in workers:
        thread.join()
    return sum(counts) / (time.perf_counter() - began)


def measure(name: str, search: Callable[[int], object], queries: int, seconds: float) -> dict[str, dict[str, float]]:
    for query in range(min(queries, 20)):  # warm-up: compiled kernels, caches
        search(query)
    figures: dict[str, dict[str, float]] = {}
    for serialised in (False, True):
        label = f"{name}_searches_per_s" + ("_serialised" if serialised else "")
        figures[label] = {
            str(threads): round(searches_per_s(search, queries, threads, seconds, serialised), 1) for threads in THREADS
        }
        print(f"{label}: " + ", ".join(f"{t} threads {v:.0f}/s" for t, v in figures[label].items()), flush=True)
    return figures


def bow_figures(items: int, queries: int, seconds: float, rng: np.random.Generator) -> dict[str, dict[str, float]]:
    started = time.perf_counter()
    spec = BowSpec.load(MODELS / "colour-texture-bow")
    codebook = spec.load_codebook()
    extractor = BowExtractor(spec, codebook, select_kernels("cpu"))
    resampler = Resampler(real_bags(extractor, rng), codebook.vocabulary)
    index = BowIndex(codebook.vocabulary, codebook.fingerprint)
    for first in range(0, items, 20_000):
        for i, (words, counts) in enumerate(resampler.sample(min(20_000, items - first), rng)):
            bag = BagOfWords(words, counts.astype(np.uint32), codebook.vocabulary, codebook.fingerprint)
            index.add(f"item-{first + i}", bag, {})
    index.merge()  # as the background merge settles after an ingest burst
    bags = [
        BagOfWords(w, c.astype(np.uint32), codebook.vocabulary, codebook.fingerprint)
        for w, c in resampler.sample(queries, rng)
    ]
    print(f"bag-of-words database: {len(index)} items, built in {time.perf_counter() - started:.0f} s", flush=True)
    return measure("bow", lambda q: index.search(bags[q], TOP_K), len(bags), seconds)


def dense_figures(items: int, queries: int, seconds: float, rng: np.random.Generator) -> dict[str, dict[str, float]]:
    started = time.perf_counter()
    db = DenseDatabase(DIMENSION)
    for i, vector in enumerate(rng.standard_normal((items, DIMENSION), dtype=np.float32)):
        db.add(f"item-{i}", vector, {})
    vectors = rng.standard_normal((queries, DIMENSION), dtype=np.float32)
    print(f"dense database: {len(db)} x {DIMENSION} Flat, built in {time.perf_counter() - started:.0f} s", flush=True)
    return measure("dense", lambda q: db.search(vectors[q], TOP_K), len(vectors), seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bow-items", type=int, default=200_000)
    parser.add_argument("--dense-items", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=2.5, help="per figure")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    result = bow_figures(args.bow_items, args.queries, args.seconds, rng)
    result.update(dense_figures(args.dense_items, args.queries, args.seconds, rng))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
