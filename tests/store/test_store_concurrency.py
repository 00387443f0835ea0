"""Several processes on one store: every outcome is one complete write, never a lost or
mixed one; readers get the rep a record names; ids and stimulus counts stay consistent."""

from __future__ import annotations

import multiprocessing
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from smd_dist.store.activation_store import (
    ActivationStore,
    CorruptStoreError,
    StoreError,
    content_hash,
    encode_name,
)

M, N = 64, 48
TRIALS = 40


def _array(value: float) -> np.ndarray:
    return np.full((M, N), value, dtype=np.float32)


def _race(path: str, who: int, trials: int, overwrite: bool, barrier, results) -> None:
    """One racing writer (a spawned process): trial ``t`` writes rep ``m/l<t>`` with the
    value ``who``, all writers released together by the barrier."""
    store = ActivationStore(path, mode="a")
    for t in range(trials):
        barrier.wait(timeout=60)
        try:
            store.write("m", f"l{t}", _array(who), overwrite=overwrite)
            results.put((t, who, "ok"))
        except StoreError as err:
            results.put((t, who, f"refused: {err}"))
        except Exception as err:  # noqa: BLE001 - reported to the test as a wrong outcome
            results.put((t, who, f"error: {type(err).__name__}: {err}"))


def _run_race(path: Path, *, overwrite: bool, writers: int = 2) -> dict:
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(writers)
    results = ctx.Queue()
    procs = [
        ctx.Process(target=_race, args=(str(path), who, TRIALS, overwrite, barrier, results))
        for who in range(1, writers + 1)
    ]
    for proc in procs:
        proc.start()
    outcomes: dict = {}
    for _ in range(TRIALS * writers):
        t, who, what = results.get(timeout=300)
        outcomes.setdefault(t, {})[who] = what
    for proc in procs:
        proc.join(timeout=60)
        assert proc.exitcode == 0
    return outcomes


@pytest.mark.slow
def test_concurrent_overwrites_leave_one_complete_rep(tmp_path):
    """Defect 1: the losing overwrite must never delete the node the pointer names."""
    store = ActivationStore(tmp_path / "s", mode="w")
    for t in range(TRIALS):
        store.write("m", f"l{t}", _array(0.0))
    outcomes = _run_race(store.path, overwrite=True)
    problems = []
    for t in range(TRIALS):
        errors = [w for w in outcomes[t].values() if w != "ok"]
        try:
            value = store.read("m", f"l{t}")[0, 0]
        except (StoreError, CorruptStoreError) as err:
            problems.append(f"trial {t}: {err}")
            continue
        if value not in (1.0, 2.0) or errors:
            problems.append(f"trial {t}: value {value}, outcomes {outcomes[t]}")
    report = store.verify()
    assert not problems, problems
    assert report.ok and report.n_reps == TRIALS, str(report)
    assert sorted(r.layer for r in store.list()) == sorted(f"l{t}" for t in range(TRIALS))


@pytest.mark.slow
def test_concurrent_first_writes_one_wins_the_other_is_refused(tmp_path):
    """Defect 1: with overwrite=False both writers used to 'succeed' and one write was lost."""
    store = ActivationStore(tmp_path / "s", mode="w")
    store.set_stimuli([f"s{i}" for i in range(M)])
    outcomes = _run_race(store.path, overwrite=False)
    problems = []
    for t in range(TRIALS):
        winners = [who for who, what in outcomes[t].items() if what == "ok"]
        losers = [what for what in outcomes[t].values() if what != "ok"]
        if len(winners) != 1 or not all("already exists" in w or "meanwhile" in w
                                        for w in losers):
            problems.append(f"trial {t}: {outcomes[t]}")
            continue
        value = store.read("m", f"l{t}")[0, 0]
        if value != winners[0]:
            problems.append(f"trial {t}: {winners[0]} won but the store holds {value}")
    assert not problems, problems
    assert store.verify().ok


def _flip(path: str, a: np.ndarray, b: np.ndarray, stop, started) -> None:
    """Overwrite rep ``m/x`` with ``a`` and ``b`` in turn until ``stop`` is set."""
    store = ActivationStore(path, mode="a")
    started.set()
    k = 0
    while not stop.is_set():
        store.write("m", "x", b if k % 2 == 0 else a, overwrite=True)
        k += 1


@pytest.mark.slow
def test_reader_gets_the_rep_its_hash_names_while_a_writer_replaces_it(tmp_path):
    """Defect 2: the engine's read must return the array whose hash it checked, or refuse."""
    from smd_dist.engine.selection import InputError
    from smd_dist.engine.tasks import RepSource, _read_rep

    rng = np.random.default_rng(0)
    a = rng.normal(size=(M, N)).astype(np.float32)
    b = rng.normal(size=(M, N)).astype(np.float32)
    store = ActivationStore(tmp_path / "s", mode="w")
    store.write("m", "x", a)
    source = RepSource(store.path, "m", "x", content_hash(a), ("{}",))
    ctx = multiprocessing.get_context("spawn")
    stop, started = ctx.Event(), ctx.Event()
    writer = ctx.Process(target=_flip, args=(store.path, a, b, stop, started))
    writer.start()
    try:
        assert started.wait(120)
        wrong, refused, corrupt, returned = [], 0, [], 0
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                got = _read_rep(source)
            except (InputError, StoreError) as err:
                if isinstance(err, CorruptStoreError):
                    corrupt.append(str(err))
                refused += 1
                continue
            returned += 1
            if not np.array_equal(got, a):
                wrong.append(content_hash(got))
    finally:
        stop.set()
        writer.join(timeout=60)
    assert returned and refused, (returned, refused)
    assert not wrong, f"{len(wrong)} of {returned} reads returned another array"
    assert not corrupt, corrupt[:3]


def test_a_second_process_cannot_write_a_rep_of_another_stimulus_count(tmp_path):
    """Defect 3: a store object made before another process set the stimuli must not
    accept a rep of a different stimulus count."""
    stale = ActivationStore(tmp_path / "s", mode="w")
    assert stale.n_stimuli is None
    code = (
        "import numpy as np\nfrom smd_dist.store import ActivationStore\n"
        f"s = ActivationStore({stale.path!r})\n"
        "s.set_stimuli([f'x{i}' for i in range(10)])\n"
        "s.write('a', 'l', np.ones((10, 3)))\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    with pytest.raises(StoreError, match="stimulus count mismatch.*b/l has 7 stimuli.*10"):
        stale.write("b", "l", np.ones((7, 3)))
    with pytest.raises(StoreError, match="already has 10 stimulus ids"):
        stale.set_stimuli([f"y{i}" for i in range(7)])
    assert stale.n_stimuli == 10
    assert [r.rep_id for r in stale.list()] == ["a/l"]
    assert stale.verify().ok


def test_verify_catches_a_rep_whose_stimulus_count_disagrees(tmp_path):
    """Defect 3: verify() must not call a store OK when one rep has other rows."""
    store = ActivationStore(tmp_path / "s", mode="w")
    store.set_stimuli([f"x{i}" for i in range(10)])
    store.write("a", "l", np.ones((10, 3)))
    other = ActivationStore(tmp_path / "other", mode="w")
    other.write("b", "l", np.ones((7, 3)))
    shutil.copytree(Path(other.path) / "reps" / "b", Path(store.path) / "reps" / "b")
    report = store.verify()
    assert not report.ok
    assert any("b/l has 7 stimuli" in p and "10" in p for p in report.rep_problems), report


def test_colliding_rep_ids_are_refused(tmp_path, rng):
    """Defect 4: model 'a/b' + layer 'c' and model 'a' + layer 'b/c' are both 'a/b/c'."""
    store = ActivationStore(tmp_path / "s", mode="w")
    x = rng.normal(size=(5, 3))
    store.write("a/b", "c", x)
    with pytest.raises(StoreError, match=r"id 'a/b/c'.*model 'a/b', layer 'c'"):
        store.write("a", "b/c", x)
    with pytest.raises(StoreError, match="id 'a/b/c'"):
        with store.writer("a", "b/c", 3) as w:
            w.append(x)
    assert [(r.model, r.layer) for r in store.list()] == [("a/b", "c")]
    store.write("a/b", "c", 2 * x, overwrite=True)  # the same rep may be replaced
    store.write("a", "b/d", x)  # ids that differ are fine
    assert len({r.rep_id for r in store.list()}) == 2
    assert store.verify().ok


def test_verify_reports_colliding_ids_written_before_the_check(tmp_path, rng):
    store = ActivationStore(tmp_path / "s", mode="w")
    other = ActivationStore(tmp_path / "o", mode="w")
    store.write("a/b", "c", rng.normal(size=(5, 3)))
    other.write("a", "b/c", rng.normal(size=(5, 3)))
    shutil.copytree(Path(other.path) / "reps" / "a", Path(store.path) / "reps" / "a")
    report = store.verify()
    assert not report.ok
    assert any("a/b/c" in p for p in report.rep_problems), report


def test_remove_during_a_write_never_leaves_an_unreported_node(tmp_path, rng):
    """A rep removed while a new version is being written: the write either lands after
    the removal or is refused, and verify() reports anything it left behind."""
    store = ActivationStore(tmp_path / "s", mode="w")
    store.write("m", "l", rng.normal(size=(6, 4)))
    outcome = None
    try:
        with store.writer("m", "l", 4, overwrite=True, chunks=(2, 4)) as w:
            w.append(rng.normal(size=(2, 4)))
            ActivationStore(store.path).remove("m", "l")
            w.append(rng.normal(size=(4, 4)))
        outcome = "written"
    except StoreError:
        outcome = "refused"
    report = store.verify()
    assert report.ok
    group = Path(store.path) / "reps" / "m" / encode_name("l")
    nodes = sorted(p.name for p in group.iterdir() if p.is_dir()) if group.exists() else []
    current = [r for r in store.list() if r.rep_id == "m/l"]
    if outcome == "written":
        assert len(current) == 1 and store.read("m", "l").shape == (6, 4)
    leftovers = [n for n in nodes if not current or n != store._current("m", "l").basename]
    for node in leftovers:
        assert any(node in line for line in report.incomplete), (node, report.incomplete)
