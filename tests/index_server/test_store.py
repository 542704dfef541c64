"""The LMDB write-ahead log and snapshots."""

import pytest

from index_server.store import ShardStore, StoreLocked


def test_log_survives_reopening_and_a_snapshot_truncates_it(tmp_path):
    store = ShardStore(tmp_path, 1 << 26)
    assert store.append([b"a", b"b"]) == 2 and store.append([b"c"]) == 3
    store.close()
    store = ShardStore(tmp_path, 1 << 26)
    assert store.last_seq == 3 and list(store.replay(0)) == [(1, b"a"), (2, b"b"), (3, b"c")]
    assert list(store.replay(2)) == [(3, b"c")]
    store.write_snapshot(2, {"db": {"rows": b"\x01\x02", "ids": b""}})
    assert store.log_length() == 1 and list(store.replay(2)) == [(3, b"c")]
    assert store.read_snapshot() == (2, {"db": {"rows": b"\x01\x02", "ids": b""}})
    store.write_snapshot(3, {"other": {"x": b"y"}})  # replaces the whole snapshot
    assert store.read_snapshot() == (3, {"other": {"x": b"y"}}) and store.log_length() == 0
    store.close()
    store = ShardStore(tmp_path, 1 << 26)
    assert store.last_seq == 3 and store.append([b"d"]) == 4  # numbering goes on after an empty log
    store.close()


def test_one_process_per_directory(tmp_path):
    store = ShardStore(tmp_path, 1 << 26)
    with pytest.raises(StoreLocked, match="in use"):
        ShardStore(tmp_path, 1 << 26)
    store.close()
    ShardStore(tmp_path, 1 << 26).close()
