"""The index's warm-up (index_server/warmup.py): in a fresh process, a shard or router that says
SERVING has compiled every kernel a client's writes and reads take (nothing compiles afterwards,
restored snapshots and word-range routing included); the first bag-of-words search after a start
takes about as long as the second; and the warm-up leaves nothing behind in the shard."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import grpc
import numpy as np

from common.config import REPO_ROOT, load_config
from common.local_suite import free_port, wait_serving
from index_server.catalogue import DatabaseSettings
from index_server.config import IndexConfig
from index_server.server import create_bundle, open_catalogue
from index_server.warmup import warm_up
from mps.index.v1 import index_pb2, index_pb2_grpc
from tests.index_server.helpers import add_request, bow, random_bags, search

# Run in a fresh interpreter: this one may have compiled the kernels already (other tests).
# Prints, as JSON, each kernel's compiled signatures once every server is SERVING, and again after
# a client's writes and reads of every kind.
PROBE = textwrap.dedent(
    """
    import json, shutil, tempfile
    import numba, numpy as np
    from common import bow_codec
    from common.config import load_config
    from index_server import inverted, merge
    from index_server.config import IndexConfig
    from index_server.server import create_bundle
    from mps.index.v1 import index_pb2
    from tests.index_server.helpers import Cluster, add_request, bow, random_bags, search, search_batch
    import grpc
    from mps.index.v1 import index_pb2_grpc

    kernels = {
        f"{m.__name__}.{n}": f for m in (inverted, merge, bow_codec) for n, f in vars(m).items()
        if isinstance(f, numba.core.dispatcher.Dispatcher)
    }
    def compiled():
        return {name: sorted(str(s) for s in f.signatures) for name, f in kernels.items()}

    data = tempfile.mkdtemp()
    config = load_config(IndexConfig, "index", environ={}, port=0, data_dir=data, access_log=False)
    first = create_bundle(config)
    cluster = Cluster("word", shards=2)
    before = compiled()

    def use(stub, groups=True):
        rng = np.random.default_rng(1)
        bags = random_bags(rng, 40, 500, codebook=3)
        adds = [add_request(f"b{i}", "things.bow", b, group_id=f"g{i % 7}") for i, b in enumerate(bags)]
        adds += [add_request(f"d{i}", "things.deep", rng.normal(size=16), group_id=f"g{i % 7}") for i in range(40)]
        stub.Add(iter(adds), timeout=30)
        for one in (False, True):
            search(stub, "things.bow", bow(bags[0]), 5, one_per_group=one)
            search_batch(stub, "things.bow", [bow(b) for b in bags[:3]], 5, one_per_group=one)
            search(stub, "things.deep", adds[-1].signature, 5, one_per_group=one)
            search_batch(stub, "things.deep", [a.signature for a in adds[-3:]], 5, one_per_group=one)
        if groups:
            for one in (False, True):
                list(stub.PartialScores(index_pb2.PartialScoresRequest(
                    database="things.bow", signature=bow(bags[1]), with_groups=one), timeout=10))
        stub.Delete(index_pb2.DeleteRequest(database="things.bow", item_ids=["b1"], group_ids=["g2"]), timeout=10)

    with grpc.insecure_channel(f"127.0.0.1:{first.port}") as channel:
        use(index_pb2_grpc.IndexServiceStub(channel))
    first.server.stop(None).wait()
    first.on_stop()  # snapshots: the next start restores the databases from it
    again = create_bundle(config)
    with grpc.insecure_channel(f"127.0.0.1:{again.port}") as channel:
        stub = index_pb2_grpc.IndexServiceStub(channel)
        assert stub.Stats(index_pb2.StatsRequest(), timeout=5).databases
        use(stub)
    use(cluster.stub, groups=False)  # the router: partial scores of both shards, merged
    cluster.close()
    again.server.stop(None).wait()
    again.on_stop()
    shutil.rmtree(data)
    print(json.dumps({"before": before, "after": compiled()}))
    """
)


def test_nothing_compiles_after_serving() -> None:
    result = subprocess.run(
        [sys.executable, "-c", PROBE], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    before, after = report["before"], report["after"]
    assert len(before) >= 8  # the kernels of inverted.py, merge.py and the codec
    assert all(before.values()), [name for name, signatures in before.items() if not signatures]
    assert after == before  # no new specialisation: a client's call compiled nothing


def test_first_bow_search_after_a_start_is_as_fast_as_the_second(tmp_path: Path) -> None:
    """With numba's on-disk cache empty (a fresh image, or a cache it cannot write), as the first
    start of a deployed shard: without the warm-up its first search compiles for ~1-3 s."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "index_server", "--port", str(port), "--data-dir", str(tmp_path / "shard")]
        + ["--log-level", "WARNING"],
        cwd=REPO_ROOT,
        env={**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / "numba-cache")},
    )
    try:
        wait_serving(f"127.0.0.1:{port}", process)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = index_pb2_grpc.IndexServiceStub(channel)
            bags = random_bags(np.random.default_rng(5), 300, 4000, codebook=9)
            stub.Add(iter(add_request(f"b{i}", "shoes.bow", b, group_id=f"g{i // 3}") for i, b in enumerate(bags)))
            times = []
            for bag in bags[:4]:
                start = time.perf_counter()
                search(stub, "shoes.bow", bow(bag), 10, one_per_group=True)
                times.append(time.perf_counter() - start)
    finally:
        process.terminate()
        process.wait(timeout=30)
    warm = min(times[1:])
    # Without the warm-up the first is seconds of compilation against milliseconds; 20 ms of
    # slack absorbs scheduling noise on a busy machine.
    assert times[0] <= 3 * warm + 0.02, times


def test_warm_up_leaves_no_database_behind(tmp_path: Path) -> None:
    config = load_config(IndexConfig, "index", environ={}, port=0, data_dir=str(tmp_path), access_log=False)
    bundle = create_bundle(config)  # warms up on its way
    try:
        with grpc.insecure_channel(f"127.0.0.1:{bundle.port}") as channel:
            stats = index_pb2_grpc.IndexServiceStub(channel).Stats(index_pb2.StatsRequest(), timeout=5)
        assert list(stats.databases) == []
        assert warm_up(DatabaseSettings(word_shard_index=1, word_shard_count=3, max_word_share=0.5)) > 0
    finally:
        bundle.server.stop(None).wait()
        assert bundle.on_stop is not None
        bundle.on_stop()
    # Nothing was logged or snapshotted either: a restart recovers no database.
    catalogue = open_catalogue(config)
    try:
        assert catalogue.stats() == []
    finally:
        catalogue.close(snapshot=False)
