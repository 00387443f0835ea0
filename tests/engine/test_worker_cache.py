"""What a worker process keeps between tasks: made once, within a byte budget, LRU out."""

from __future__ import annotations

import os
import threading

import numpy as np
import psutil
import pytest

from smd_dist.engine import worker_cache


@pytest.fixture(autouse=True)
def empty_cache():
    worker_cache.clear()
    yield
    worker_cache.clear()


def _maker(nbytes, log):
    def make():
        log.append(nbytes)
        return {"prep": np.zeros(nbytes // 8)}

    return make


def test_a_value_is_made_once_while_it_fits():
    log = []
    first = worker_cache.kept("a", _maker(800, log), budget=10_000)
    again = worker_cache.kept("a", _maker(800, log), budget=10_000)
    assert first is again and log == [800]
    stats = worker_cache.stats()
    assert stats["kept_bytes"] == 800
    assert stats["made"] >= 1 and stats["hits"] >= 1


def test_least_recently_used_leaves_first():
    log = []
    for key in "abc":
        worker_cache.kept(key, _maker(400, log), budget=1000)  # room for two
    assert log == [400, 400, 400]
    worker_cache.kept("c", _maker(400, log), budget=1000)  # kept: most recent
    worker_cache.kept("b", _maker(400, log), budget=1000)  # kept
    assert len(log) == 3
    worker_cache.kept("a", _maker(400, log), budget=1000)  # left first: made again
    assert len(log) == 4
    assert worker_cache.stats()["kept_bytes"] <= 1000


def test_a_value_larger_than_the_budget_is_returned_but_not_kept():
    log = []
    value = worker_cache.kept("big", _maker(4000, log), budget=1000)
    assert value["prep"].nbytes == 4000
    worker_cache.kept("big", _maker(4000, log), budget=1000)
    assert log == [4000, 4000]
    assert worker_cache.stats()["kept_bytes"] == 0


def test_a_zero_budget_keeps_nothing_and_a_new_budget_starts_empty():
    log = []
    worker_cache.kept("a", _maker(80, log), budget=0)
    worker_cache.kept("a", _maker(80, log), budget=0)
    assert len(log) == 2
    worker_cache.kept("a", _maker(80, log), budget=1000)
    worker_cache.kept("a", _maker(80, log), budget=2000)  # another budget: made again
    assert len(log) == 4
    assert worker_cache.clear() == 80
    assert worker_cache.stats()["kept_bytes"] == 0


def _ask_from_threads(n, make, budget=10_000):
    """``kept("k", make)`` from ``n`` threads at once; their values or exceptions."""
    seen = []

    def ask():
        try:
            seen.append(worker_cache.kept("k", make, budget=budget))
        except Exception as err:  # noqa: BLE001 - what each thread got is the point
            seen.append(err)

    threads = [threading.Thread(target=ask) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    return seen


def test_threads_asking_at_once_make_the_value_once():
    calls, release = [], threading.Event()

    def make():
        calls.append(1)
        release.wait(timeout=10)  # the other threads ask while this one makes
        return np.zeros(10)

    before = worker_cache.stats()
    threading.Timer(0.3, release.set).start()
    seen = _ask_from_threads(4, make)
    assert len(calls) == 1
    assert len(seen) == 4 and all(v is seen[0] for v in seen)
    assert worker_cache.kept("k", lambda: pytest.fail("should be kept"), budget=10_000) is seen[0]
    stats = worker_cache.stats()
    assert stats["made"] - before["made"] == 1
    assert stats["hits"] - before["hits"] == 4  # three waiters and the call above
    assert stats["kept_bytes"] == 80


def test_threads_waiting_on_a_failed_make_get_its_error_and_nothing_is_kept():
    calls, release = [], threading.Event()

    def make():
        calls.append(1)
        release.wait(timeout=10)
        raise ValueError("rep-x/layer: NaN at stimulus 3")

    before = worker_cache.stats()
    threading.Timer(0.3, release.set).start()
    seen = _ask_from_threads(3, make)
    assert len(calls) == 1
    assert len(seen) == 3 and all(isinstance(v, ValueError) for v in seen)
    assert all("NaN at stimulus 3" in str(v) for v in seen)
    assert worker_cache.kept("k", lambda: np.ones(2), budget=10_000).tolist() == [1.0, 1.0]
    assert worker_cache.stats()["made"] - before["made"] == 1  # the later success only


def test_nbytes_counts_arrays_inside_mappings_and_sequences():
    value = {"a": np.zeros(3), "b": [np.zeros(2, np.float32), (np.zeros(1),)], "c": "text"}
    assert worker_cache.nbytes(value) == 24 + 8 + 8


def test_memory_limit_outside_a_worker_is_a_cores_share_of_the_machine():
    assert worker_cache.memory_limit() == psutil.virtual_memory().total // os.cpu_count()


def test_kept_bytes_count_the_copies_a_prepared_rep_makes_after_it_is_kept(tmp_path):
    """The low-precision copies the bounds make on a rep's first sparse pair are part of
    what the worker keeps (they used to go uncounted: +27-50 %)."""
    from smd_dist.engine import selection, tasks
    from smd_dist.store import ActivationStore

    rng = np.random.default_rng(0)
    store = ActivationStore(tmp_path / "s", mode="w")
    for layer in ("a", "b"):
        store.write("m", layer, rng.normal(size=(40, 600)))  # the sparse path: 512² up
    prep = selection.prep_key({"center": True, "normalize": None})
    sources = {k: tasks.RepSource(store.path, r.model, r.layer, r.content_hash, (prep,))
               for k, r in enumerate(store.list())}
    fraction = 0.25
    result = tasks.compare_block([0], [1], sources, [("soft_matching", prep, {})], "cpu",
                                 fraction)
    assert result.error[0, 0] == -1 and result.solvers[result.solver[0, 0]].startswith("sparse")
    budget = int(fraction * worker_cache.memory_limit())
    kept = [worker_cache.kept(s, lambda: pytest.fail("not kept"), budget=budget)
            for s in sources.values()]
    held = sum(worker_cache.nbytes(v) for v in kept)
    columns = sum(v[prep].columns.nbytes for v in kept)
    assert held > 1.2 * columns  # the copies exist ...
    assert worker_cache.stats()["kept_bytes"] == held  # ... and are counted


def test_kept_values_are_released_under_memory_pressure(monkeypatch):
    """Past Dask's spill threshold of the worker's memory, what is kept is let go."""
    from types import SimpleNamespace

    log = []
    for key in "ab":
        worker_cache.kept(key, _maker(800, log), budget=10_000)
    assert worker_cache.stats()["kept_bytes"] == 1600
    full = worker_cache.memory_limit()
    monkeypatch.setattr(psutil.Process, "memory_info", lambda self: SimpleNamespace(rss=full))
    worker_cache.kept("c", _maker(800, log), budget=10_000)
    assert worker_cache.stats()["kept_bytes"] == 0
    monkeypatch.undo()
    worker_cache.kept("a", _maker(800, log), budget=10_000)
    assert log == [800] * 4 and worker_cache.stats()["kept_bytes"] == 800
