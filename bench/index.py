"""The bag-of-words inverted index at 100k and 1M items: latency, memory, ingest, vs brute force;
then the sharding layouts over real shard processes.

    .venv/bin/python bench/index.py [--sizes 100000 1000000] [--queries 100] [--layout-size 100000]

Signatures are realistic: the word statistics come from real photos through the real codebook. Bags
of ~200 crops of the bundled photos are computed; each synthetic item resamples one of them (its
keypoint count, 80% of its words drawn from that photo's histogram, 20% from the global word
frequencies), so posting-list lengths and query overlaps follow real data. Queries are fresh
resamples. Per size: p50/p99 of one exact top-10 search in the shard's index (in-process, no gRPC),
bytes per item of the index, ingest rate through BowIndex.add; in the same run, the same queries by
brute-force sparse chi-squared (scipy CSR over every stored word of every item) and, where it fits
in memory, FAISS exact inner product on Hellinger-mapped vectors (sqrt of the histogram). Last line:
one JSON object.

Layouts (--layout-size items, 0 skips): real shard processes (durable, LMDB in a temp dir) behind a
router process, queried over gRPC: one shard alone, then item-range and word-range layouts with
--shards shards. For each: ingest rate through the router (acknowledged = fsynced), search p50/p99,
shard memory (RSS) per item, recall@10 against the exact answer, and recall@10 with one shard
killed (the degraded answer); for one shard, restart time from its snapshot.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
import numpy as np
import scipy.sparse as sp
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.reference import dense
from common.bow_codec import BagOfWords, encode
from common.local_suite import free_port, wait_serving
from common.photos import SKIMAGE_PHOTOS, SKLEARN_PHOTOS, load_photo
from index_server.inverted import BowIndex
from kernels import select_kernels
from mps.common.v1 import common_pb2
from mps.index.v1 import index_pb2, index_pb2_grpc
from signature_server.bow import BowExtractor, BowSpec

ROOT = Path(__file__).resolve().parent.parent
STOP_WORD_SHARES = (0.2, 0.1, 0.05)
MODELS = ROOT / "models"


def real_bags(extractor: BowExtractor, rng: np.random.Generator) -> list[BagOfWords]:
    bags = []
    for name in SKIMAGE_PHOTOS + SKLEARN_PHOTOS:
        photo = load_photo(name)
        h, w = photo.shape[:2]
        for _ in range(16):
            side = rng.uniform(0.25, 1.0)
            ch, cw = int(h * side), int(w * side)
            y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
            bags.append(extractor.bag(photo[y : y + ch, x : x + cw]))
    return bags


class Resampler:
    def __init__(self, bags: list[BagOfWords], vocabulary: int):
        self.bags = bags
        self.vocabulary = vocabulary
        total = np.zeros(vocabulary)
        for b in bags:
            total[b.words] += b.counts
        self.global_cdf = np.cumsum(total / total.sum())
        self.sizes = np.array([int(b.counts.sum()) for b in bags])

    def sample(self, count: int, rng: np.random.Generator) -> list[tuple[np.ndarray, np.ndarray]]:
        """count items -> [(words int32 sorted, counts uint16)]: each like a real bag (its template)
        in distinct words and in counts (whatever the assignment: hard, one unit per keypoint, or
        soft, several words and units per keypoint): 80% of its words drawn from the template's
        (without replacement, by count), the rest from the catalogue-wide frequencies, each with
        one of the template's counts."""
        out = []
        templates = rng.integers(0, len(self.bags), count)
        for t in templates:
            bag = self.bags[t]
            distinct = len(bag.words)
            own = min(distinct, round(0.8 * distinct))
            mine = rng.choice(bag.words, size=own, replace=False, p=bag.counts / bag.counts.sum())
            others = np.minimum(np.searchsorted(self.global_cdf, rng.random(distinct - own)), self.vocabulary - 1)
            words = np.unique(np.concatenate([mine, others]))
            counts = rng.choice(bag.counts, size=len(words))
            out.append((words.astype(np.int32), counts.astype(np.uint16)))
        return out


def brute_force(matrix: sp.csr_matrix, query: np.ndarray, top_k: int) -> np.ndarray:
    """Exact chi2 over every stored word of every item: 2 - sum 4xq/(x+q); rows of the top_k."""
    q = query[matrix.indices]
    x = matrix.data
    with np.errstate(invalid="ignore", divide="ignore"):
        terms = np.where(q > 0, 4 * x * q / (x + q), 0.0)
    overlap = np.add.reduceat(terms, matrix.indptr[:-1]) if len(terms) else np.zeros(matrix.shape[0])
    overlap[np.diff(matrix.indptr) == 0] = 0
    best = np.argpartition(-overlap, top_k)[:top_k]
    return best[np.argsort(-overlap[best])]


def measure(
    size: int, resampler: Resampler, queries: list[BagOfWords], fingerprint: int, rng, top_k: int
) -> dict[str, float]:
    index = BowIndex(resampler.vocabulary, fingerprint)
    rows, cols, vals = [], [], []
    added, add_seconds = 0, 0.0
    with tqdm(total=size, desc=f"ingest {size}", unit="item", mininterval=2) as bar:
        while added < size:
            chunk = resampler.sample(min(20_000, size - added), rng)
            start = time.perf_counter()
            for i, (words, counts) in enumerate(chunk):
                index.add(
                    f"item-{added + i}",
                    BagOfWords(words, counts.astype(np.uint32), resampler.vocabulary, fingerprint),
                    {},
                )
            add_seconds += time.perf_counter() - start
            for i, (words, counts) in enumerate(chunk):
                rows.append(np.full(len(words), added + i, np.int32))
                cols.append(words)
                vals.append(counts / counts.sum(dtype=np.float64))
            added += len(chunk)
            bar.update(len(chunk))
    matrix = sp.csr_matrix(
        (np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(size, resampler.vocabulary)
    )
    postings = matrix.nnz
    index.merge()  # the background merge of the append tail, as it settles after an ingest burst

    index_ms, brute_ms, agree, truth = [], [], 0, []
    for q in queries:
        start = time.perf_counter()
        hits = index.search(q, top_k)
        index_ms.append((time.perf_counter() - start) * 1000)
        start = time.perf_counter()
        best = brute_force(matrix, dense(q).astype(np.float64), top_k)
        brute_ms.append((time.perf_counter() - start) * 1000)
        truth.append({f"item-{r}" for r in best})
        agree += len({h.item_id for h in hits} & truth[-1])
    figures = {
        "p50_ms": float(np.percentile(index_ms, 50)),
        "p99_ms": float(np.percentile(index_ms, 99)),
        "brute_p50_ms": float(np.percentile(brute_ms, 50)),
        "bytes_per_item": index.nbytes() / size,
        "postings_per_item": postings / size,
        "ingest_per_s": size / add_seconds,
        "recall_at_10": agree / (top_k * len(queries)),
    }
    figures["speedup_vs_bruteforce"] = figures["brute_p50_ms"] / figures["p50_ms"]

    # The stop-word variant: skip query words held by more than a share of the items.
    for share in STOP_WORD_SHARES:
        index.max_word_share = share
        variant_ms, agree = [], 0
        for q, best_ids in zip(queries, truth):
            start = time.perf_counter()
            hits = index.search(q, top_k)
            variant_ms.append((time.perf_counter() - start) * 1000)
            agree += len({h.item_id for h in hits} & best_ids)
        figures[f"stopwords_{share}_p50_ms"] = float(np.percentile(variant_ms, 50))
        figures[f"stopwords_{share}_recall_at_10"] = agree / (top_k * len(queries))
    index.max_word_share = 1.0

    dense_bytes = size * resampler.vocabulary * 4
    if dense_bytes <= 4 * 2**30:
        import faiss

        flat = faiss.IndexFlatIP(resampler.vocabulary)
        for start in range(0, size, 20_000):
            block = matrix[start : start + 20_000].toarray().astype(np.float32)
            flat.add(np.sqrt(block))
        faiss_ms = []
        for q in queries:
            vector = np.sqrt(dense(q))[None, :]
            start = time.perf_counter()
            flat.search(vector, top_k)
            faiss_ms.append((time.perf_counter() - start) * 1000)
        figures["faiss_flat_hellinger_p50_ms"] = float(np.percentile(faiss_ms, 50))
        figures["speedup_vs_faiss_flat"] = figures["faiss_flat_hellinger_p50_ms"] / figures["p50_ms"]
        del flat
    else:
        print(f"FAISS flat on Hellinger vectors skipped at {size}: {dense_bytes / 2**30:.0f} GiB of float32")
    return figures


def start(args: list[str], port: int) -> subprocess.Popen:
    process = subprocess.Popen(
        [sys.executable, "-m", "index_server", *args, "--port", str(port), "--log-level", "WARNING"], cwd=ROOT
    )
    wait_serving(f"127.0.0.1:{port}", process)
    return process


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def search_ids(stub, bag: BagOfWords, top_k: int) -> list[str]:
    signature = common_pb2.Signature(kind=common_pb2.SIGNATURE_KIND_BOW, bow=encode(bag))
    return [
        i.item_id
        for c in stub.Search(index_pb2.SearchRequest(database="bags", signature=signature, top_k=top_k), timeout=30)
        for i in c.items
    ]


def measure_layout(
    layout: str,
    shards: int,
    items: list[tuple[np.ndarray, np.ndarray]],
    queries: list[BagOfWords],
    exact: list[list[str]],
    fingerprint: int,
    vocabulary: int,
    top_k: int,
) -> dict[str, float]:
    """One layout over real processes: ingest through the router, search, then kill a shard."""
    figures: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as data:
        ports = [free_port() for _ in range(shards + 1)]
        processes = [
            start(
                [
                    "--data-dir",
                    f"{data}/shard{i}",
                    "--word-shard-index",
                    str(i if layout == "word" else 0),
                    "--word-shard-count",
                    str(shards if layout == "word" else 1),
                ],
                ports[i],
            )
            for i in range(shards)
        ]
        shard_list = json.dumps([[f"127.0.0.1:{p}"] for p in ports[:shards]])
        processes.append(start(["router", "--layout", layout, "--shards", shard_list], ports[-1]))
        try:
            base_rss = sum(rss_bytes(p.pid) for p in processes[:shards])
            with grpc.insecure_channel(
                f"127.0.0.1:{ports[-1]}", options=[("grpc.max_send_message_length", 1 << 28)]
            ) as channel:
                stub = index_pb2_grpc.IndexServiceStub(channel)
                start_s = time.perf_counter()
                for first in range(0, len(items), 5000):
                    stub.Add(
                        iter(
                            [
                                index_pb2.AddRequest(
                                    item_id=f"item-{first + i}",
                                    database="bags",
                                    signature=common_pb2.Signature(
                                        kind=common_pb2.SIGNATURE_KIND_BOW,
                                        bow=encode(BagOfWords(w, c.astype(np.uint32), vocabulary, fingerprint)),
                                    ),
                                )
                                for i, (w, c) in enumerate(items[first : first + 5000])
                            ]
                        ),
                        timeout=600,
                    )
                figures["ingest_per_s"] = len(items) / (time.perf_counter() - start_s)
                figures["shard_rss_bytes_per_item"] = (
                    sum(rss_bytes(p.pid) for p in processes[:shards]) - base_rss
                ) / len(items)
                for query in queries[:5]:  # warm-up: channels, numba caches, merges settling
                    search_ids(stub, query, top_k)
                latencies, agree = [], 0
                for query, truth in zip(queries, exact):
                    t = time.perf_counter()
                    ids = search_ids(stub, query, top_k)
                    latencies.append((time.perf_counter() - t) * 1000)
                    agree += len(set(ids) & set(truth))
                figures["p50_ms"] = float(np.percentile(latencies, 50))
                figures["p99_ms"] = float(np.percentile(latencies, 99))
                figures["recall_at_10"] = agree / (top_k * len(queries))
                if shards > 1:
                    processes[-2].kill()  # the last shard dies
                    processes[-2].wait()
                    agree = 0
                    for query, truth in zip(queries, exact):
                        agree += len(set(search_ids(stub, query, top_k)) & set(truth))
                    figures["recall_at_10_one_shard_dead"] = agree / (top_k * len(queries))
            if shards == 1:  # restart time: SIGTERM writes a snapshot; start-up loads it
                processes[0].terminate()
                processes[0].wait()
                t = time.perf_counter()
                processes[0] = start(["--data-dir", f"{data}/shard0"], ports[0])
                figures["restart_s"] = time.perf_counter() - t
        finally:
            for process in processes:
                if process.poll() is None:
                    process.terminate()
            for process in processes:
                process.wait()
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--top-k", type=int, default=10)
    parser.add_argument("--layout-size", type=int, default=100_000)
    parser.add_argument("--shards", type=int, default=2)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    spec = BowSpec.load(MODELS / "colour-texture-bow")
    codebook = spec.load_codebook()
    extractor = BowExtractor(spec, codebook, select_kernels("cpu"))
    bags = real_bags(extractor, rng)
    resampler = Resampler(bags, codebook.vocabulary)
    print(
        f"{len(bags)} real bags: median {int(np.median([len(b.words) for b in bags]))} distinct words, "
        f"{int(np.median(resampler.sizes))} keypoints"
    )
    queries = [
        BagOfWords(w, c.astype(np.uint32), codebook.vocabulary, codebook.fingerprint)
        for w, c in resampler.sample(args.queries, rng)
    ]
    result: dict[str, float] = {}
    for size in args.sizes:
        figures = measure(size, resampler, queries, codebook.fingerprint, rng, args.top_k)
        label = f"{size // 1000}k" if size < 1_000_000 else f"{size // 1_000_000}m"
        print(f"{size} items: " + ", ".join(f"{k} {v:.3g}" for k, v in figures.items()))
        result.update({f"{k}_{label}": round(v, 3) for k, v in figures.items()})
    if args.layout_size:
        items = resampler.sample(args.layout_size, rng)
        truth = BowIndex(resampler.vocabulary, codebook.fingerprint, background_merge=False)
        for i, (w, c) in enumerate(items):
            truth.add(f"item-{i}", BagOfWords(w, c.astype(np.uint32), resampler.vocabulary, codebook.fingerprint), {})
        exact = [[h.item_id for h in truth.search(q, args.top_k)] for q in queries]
        del truth
        for layout, shards in (("single", 1), ("item", args.shards), ("word", args.shards)):
            figures = measure_layout(
                "item" if layout == "single" else layout,
                shards,
                items,
                queries,
                exact,
                codebook.fingerprint,
                resampler.vocabulary,
                args.top_k,
            )
            print(
                f"layout {layout} x{shards}, {args.layout_size} items over gRPC: "
                + ", ".join(f"{k} {v:.3g}" for k, v in figures.items())
            )
            result.update({f"{layout}_{k}": round(v, 3) for k, v in figures.items()})
    print(json.dumps(result))


if __name__ == "__main__":
    main()
