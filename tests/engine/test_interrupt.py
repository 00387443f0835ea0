"""Ctrl-C during ``smd-dist run``: a short message, exit 130, workers gone, the ledger whole.

The run is held at a known point whatever the machine's speed: a worker preload (Dask's
``distributed.worker.preload``) lets the first pair tasks through and holds every later one
while a gate file exists, so exactly that many pairs reach the ledger before the interrupt.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from smd_dist.engine import compute_distances
from smd_dist.engine.output import ResultsOutput, open_distances
from smd_dist.store import ActivationStore

pytestmark = pytest.mark.slow

M = 30
N_REPS = 6
N_PAIRS = N_REPS * (N_REPS - 1) // 2
LET_THROUGH = 3

PRELOAD = '''
"""Test preload: block tasks after the first {let} wait while the gate file exists."""
import os
import time

from smd_dist.engine import tasks

_real = tasks.compare_block
_calls = [0]


def _held(*args, **kwargs):
    _calls[0] += 1
    if _calls[0] > {let}:
        deadline = time.monotonic() + 300
        while os.path.exists({gate!r}) and time.monotonic() < deadline:
            time.sleep(0.05)
    return _real(*args, **kwargs)


def dask_setup(worker):
    tasks.compare_block = _held
    open(os.path.join({pids!r}, str(os.getpid())), "w").close()
'''


def pairs_in_ledger(output: Path) -> int:
    total = 0
    for header in (output / "ledger").glob("p*/zarr.json"):
        attrs = json.loads(header.read_text()).get("attributes", {})
        if attrs.get("complete"):
            total += int(attrs.get("n", 0))
    return total


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie has exited: only its parent has not read its status yet
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[-1][0] != "Z"
    except OSError:
        return False


def test_ctrl_c_saves_what_is_done_and_the_same_command_resumes(tmp_path):
    from distributed import Client, LocalCluster

    rng = np.random.default_rng(3)
    store = ActivationStore(tmp_path / "store", mode="a")
    for k in range(N_REPS):
        store.write(f"net{k // 3}", f"layer{k % 3}", rng.standard_normal((M, 5 + k)))
    with (
        LocalCluster(n_workers=1, threads_per_worker=1, processes=False,
                     dashboard_address=":0") as cluster,
        Client(cluster) as client,
    ):
        clean = compute_distances(store, client=client, progress=False)["soft_matching"]
    output, gate, pids = tmp_path / "out", tmp_path / "gate", tmp_path / "pids"
    pids.mkdir()
    gate.touch()
    preload = tmp_path / "hold_pairs.py"
    preload.write_text(textwrap.dedent(PRELOAD.format(let=LET_THROUGH, gate=str(gate),
                                                      pids=str(pids))))
    config = tmp_path / "run.yaml"
    config.write_text(
        f"store: {store.path}\noutput: {output}\n"
        "cluster: {kind: local, n-workers: 1, threads-per-worker: 1}\n"
        "engine: {flush-seconds: 0.2, task-entries: 0}\n"
    )
    env = {**os.environ, "DASK_DISTRIBUTED__WORKER__PRELOAD": json.dumps([str(preload)])}
    # A session of its own: Ctrl-C in a terminal signals the whole foreground group.
    proc = subprocess.Popen(
        [sys.executable, "-m", "smd_dist", "run", str(config)], env=env,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 240
        while pairs_in_ledger(output) < LET_THROUGH and proc.poll() is None:
            assert time.monotonic() < deadline, "the first pairs never reached the ledger"
            time.sleep(0.1)
        assert proc.poll() is None, proc.stdout.read()
        workers = [int(p.name) for p in pids.iterdir()]
        assert len(workers) == 1 and alive(workers[0])
        os.killpg(proc.pid, signal.SIGINT)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        gate.unlink()
    assert proc.returncode == 130, out
    assert (
        f"smd-dist: interrupted: {LET_THROUGH} of {N_PAIRS} pairs saved; run the same "
        "command again to resume" in out
    ), out
    assert "Traceback" not in out and "Aborted" not in out, out
    assert not alive(workers[0]), "the worker outlived the run"
    assert not Path(f"{output}.lock").exists() and not Path(f"{output}.lock.json").exists()
    read = ResultsOutput(output).read(on_corrupt="raise")
    latest = read.records.latest()
    assert len(latest) == LET_THROUGH and read.corrupt == () and read.incomplete == ()
    assert latest.ok.all()
    rerun = subprocess.run(
        [sys.executable, "-m", "smd_dist", "run", "--no-progress", str(config)],
        capture_output=True, text=True, timeout=300,
    )
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    done = re.search(r"(\d+) already done, (\d+) computed", rerun.stdout)
    assert done and done.groups() == (str(LET_THROUGH), str(N_PAIRS - LET_THROUGH)), rerun.stdout
    final = open_distances(output)["soft_matching"]
    assert final.values.tobytes() == clean.values.tobytes()
