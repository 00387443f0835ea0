"""Faults during a run: killed workers, a killed driver, concurrent runs, corruption, failures.

Each fault must cost only the time it cost: the final matrix is bit-identical to a clean
run's, finished pairs are not computed again, and nothing is read as data that failed a
checksum.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import dask.config
import numpy as np
import pytest
from click.testing import CliRunner

from smd_dist import metrics
from smd_dist.cli import main
from smd_dist.engine import InputError, RunReport, compute_distances, tasks
from smd_dist.engine.output import CorruptOutputError, ResultsOutput, open_distances
from smd_dist.store import ActivationStore

pytestmark = pytest.mark.slow

M = 200
WIDTHS = [300, 360, 420, 300, 480, 360, 432, 300, 360, 480]


def build_store(path: Path, widths=WIDTHS) -> ActivationStore:
    rng = np.random.default_rng(42)
    store = ActivationStore(path, mode="a")
    latent = rng.standard_normal((M, 20))
    for k, width in enumerate(widths):
        x = latent @ rng.standard_normal((20, width)) + 0.5 * rng.standard_normal((M, width))
        store.write(f"net{k // 3}", f"layer.{k % 3}", x)
    return store


@pytest.fixture(scope="module")
def workload(tmp_path_factory):
    """A store and the matrix a clean in-memory run gives on it."""
    from distributed import Client, LocalCluster

    root = tmp_path_factory.mktemp("faults")
    store = build_store(root / "store")
    with (
        LocalCluster(
            n_workers=1, threads_per_worker=2, processes=False, dashboard_address=":0"
        ) as cluster,
        Client(cluster) as client,
    ):
        clean = compute_distances(store, client=client, progress=False)
    return store, clean["soft_matching"].values


N_PAIRS = len(WIDTHS) * (len(WIDTHS) - 1) // 2
# Wider layers for the tests that kill or race a whole `smd-dist run`: the run must still be
# going (tens of seconds) when the test acts, however fast the machine.
HEAVY_WIDTHS = [900, 1000, 1100, 900, 1200, 1000, 1100, 900, 1000, 1200]


@pytest.fixture(scope="module")
def heavy_workload(tmp_path_factory):
    from distributed import Client, LocalCluster

    store = build_store(tmp_path_factory.mktemp("heavy") / "store", widths=HEAVY_WIDTHS)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                      dashboard_address=":0") as cluster, Client(cluster) as client:
        clean = compute_distances(store, client=client, progress=False)
    return store, clean["soft_matching"].values


def write_config(path: Path, store: ActivationStore, output: Path, extra: str = "") -> Path:
    path.write_text(
        f"store: {store.path}\noutput: {output}\nmetrics: [soft_matching]\n"
        f"cluster: {{kind: local, n-workers: 2}}\n{extra}"
    )
    return path


def cli(*args, env_extra=None, **kwargs):
    env = {
        **os.environ,
        "DASK_SMD_DIST__ENGINE__FLUSH_SECONDS": "0.2",
        "DASK_SMD_DIST__ENGINE__TASK_ENTRIES": "0",
        **(env_extra or {}),
    }
    return subprocess.Popen(
        [sys.executable, "-m", "smd_dist", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        **kwargs,
    )


def pairs_in_ledger(output: Path) -> int:
    """Records in complete ledger parts, read from the part headers alone (cheap to poll)."""
    total = 0
    for header in (output / "ledger").glob("p*/zarr.json"):
        try:
            attrs = json.loads(header.read_text()).get("attributes", {})
        except (OSError, ValueError):
            continue
        if attrs.get("complete"):
            total += int(attrs.get("n", 0))
    return total


def test_worker_killed_mid_run_gives_identical_matrix(heavy_workload, tmp_path):
    from distributed import Client, LocalCluster

    store, clean = heavy_workload
    output = tmp_path / "out"
    killed_at = []
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                      dashboard_address=":0") as cluster, Client(cluster) as client:
        pids = list(client.run(os.getpid).values())

        def kill_one():
            deadline = time.monotonic() + 120
            while pairs_in_ledger(output) < 2 and time.monotonic() < deadline:
                time.sleep(0.05)
            os.kill(pids[0], signal.SIGKILL)
            killed_at.append(time.monotonic())

        killer = threading.Thread(target=kill_one)
        killer.start()
        report = RunReport(0, 0, 0)
        with dask.config.set({"smd-dist.engine.flush-seconds": 0.1,
                              "smd-dist.engine.task-entries": 0}):
            ds = compute_distances(store, output=output, client=client, progress=False,
                                   report=report)
        finished_at = time.monotonic()
        killer.join()
        assert pids[0] not in client.run(os.getpid).values()
    assert killed_at and killed_at[0] < finished_at, "the worker was not killed mid-run"
    assert report.failed == []
    assert report.n_records_written == N_PAIRS
    assert ds["soft_matching"].values.tobytes() == clean.tobytes()


def test_driver_killed_then_resume_recomputes_only_missing(heavy_workload, tmp_path):
    store, clean = heavy_workload
    output = tmp_path / "out"
    config = write_config(tmp_path / "run.yaml", store, output)
    proc = cli("run", str(config), "--no-progress")
    deadline = time.monotonic() + 120
    while pairs_in_ledger(output) < 2 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed: " + proc.stdout.read()
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    done = pairs_in_ledger(output)
    assert 2 <= done < N_PAIRS
    before = subprocess.run(
        [sys.executable, "-m", "smd_dist", "status", str(output)], capture_output=True, text=True
    ).stdout
    rerun = cli("run", str(config), "--no-progress")
    out, _ = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, out
    match = re.search(r"(\d+) already done, (\d+) computed", out)
    assert match, out
    assert int(match.group(1)) == done, out + before
    assert int(match.group(2)) == N_PAIRS - done
    final = open_distances(output)
    assert final["soft_matching"].values.tobytes() == clean.tobytes()


def test_second_concurrent_run_is_refused_and_first_finishes(heavy_workload, tmp_path):
    store, clean = heavy_workload
    output = tmp_path / "out"
    config = write_config(tmp_path / "run.yaml", store, output)
    first = cli("run", str(config), "--no-progress")
    deadline = time.monotonic() + 120
    lock_info = Path(f"{output}.lock.json")
    while not lock_info.exists() and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    second = cli("run", str(config), "--no-progress")
    out2, _ = second.communicate(timeout=120)
    out1, _ = first.communicate(timeout=300)
    assert second.returncode == 2, out2
    assert "being written by another run" in out2 and f"pid {first.pid}" in out2
    assert first.returncode == 0, out1
    assert open_distances(output)["soft_matching"].values.tobytes() == clean.tobytes()


def test_corrupt_store_chunk_is_refused_naming_the_rep(tmp_path):
    from distributed import Client, LocalCluster

    store = build_store(tmp_path / "store")
    node = next(p for p in Path(store.path).rglob("c") if "net1" in str(p) and "layer.2" in str(p))
    chunk = next(p for p in node.rglob("*") if p.is_file())
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF
    chunk.write_bytes(bytes(data))
    with (
        LocalCluster(
            n_workers=1, threads_per_worker=1, processes=False, dashboard_address=":0"
        ) as cluster,
        Client(cluster) as client,
    ):
        with pytest.raises(InputError, match=r"net1/layer\.2"):
            compute_distances(store, output=tmp_path / "out", client=client, progress=False)
    assert pairs_in_ledger(tmp_path / "out") == 0


def test_corrupt_output_is_detected_and_its_pairs_recomputed(workload, tmp_path):
    from distributed import Client, LocalCluster

    store, clean = workload
    output = tmp_path / "out"
    with (
        LocalCluster(
            n_workers=1, threads_per_worker=2, processes=False, dashboard_address=":0"
        ) as cluster,
        Client(cluster) as client,
    ):
        compute_distances(store, output=output, client=client, progress=False)
        matrix_chunk = next(
            p
            for p in (output / "soft_matching").rglob("*")
            if p.is_file() and p.name != "zarr.json"
        )
        matrix_chunk.unlink()
        with pytest.raises(CorruptOutputError, match="soft_matching"):
            open_distances(output)
        (part,) = ResultsOutput(output).ledger.part_names()
        chunk = next(
            p
            for p in (output / "ledger" / part / "num").rglob("*")
            if p.is_file() and p.name != "zarr.json"
        )
        data = bytearray(chunk.read_bytes())
        data[-5] ^= 0xFF
        chunk.write_bytes(bytes(data))
        with pytest.raises(CorruptOutputError, match="pairs affected"):
            ResultsOutput(output).read()
        report = RunReport(0, 0, 0)
        ds = compute_distances(store, output=output, client=client, progress=False, report=report)
    assert report.corrupt_parts and report.n_computed == N_PAIRS
    assert (output / "quarantine" / part).is_dir()
    assert ds["soft_matching"].values.tobytes() == clean.tobytes()
    assert open_distances(output)["soft_matching"].values.tobytes() == clean.tobytes()


def test_failing_pair_exits_nonzero_status_lists_it_rerun_retries_it(tmp_path, monkeypatch):
    from distributed import LocalCluster

    store = build_store(tmp_path / "store")
    real = metrics.get("soft_matching")

    class Failing:
        def __getattr__(self, name):
            return getattr(real, name)

        def compute(self, xa, xb, **kw):
            if xa.shape[1] == 432 or xb.shape[1] == 432:
                raise FloatingPointError("injected solver failure")
            return real.compute(xa, xb, **kw)

    with LocalCluster(
        n_workers=1, threads_per_worker=2, processes=False, dashboard_address=":0"
    ) as cluster:
        config = tmp_path / "run.yaml"
        config.write_text(
            f"store: {store.path}\noutput: {tmp_path / 'out'}\n"
            f"cluster: {{kind: address, address: '{cluster.scheduler_address}'}}\n"
        )
        runner = CliRunner()
        with monkeypatch.context() as mp:
            mp.setattr(
                tasks.metric_registry,
                "get",
                lambda name: Failing() if name == "soft_matching" else metrics.get(name),
            )
            result = runner.invoke(main, ["run", str(config), "--no-progress"])
        assert result.exit_code == 1, result.output
        assert "9 pair result(s) failed" in result.output
        assert "injected solver failure" in result.output
        status = runner.invoke(main, ["status", str(tmp_path / "out")])
        assert "failed      9" in status.output and "net2/layer.0" in status.output
        result = runner.invoke(main, ["run", str(config), "--no-progress"])
        assert result.exit_code == 0, result.output
        assert f"{N_PAIRS - 9} already done, 9 computed" in result.output


def test_unwritable_output_is_refused_by_the_cli(workload, tmp_path):
    store, _ = workload
    blocker = tmp_path / "file"
    blocker.write_text("")
    config = write_config(tmp_path / "run.yaml", store, blocker / "out")
    result = CliRunner().invoke(main, ["run", str(config), "--no-progress"])
    assert result.exit_code == 2 and "not writable" in result.output


def test_losing_the_scheduler_mid_run_exits_2_with_one_line_saying_resume(workload, tmp_path):
    """A scheduler that dies mid-run: exit 2 (not 1, 'pairs failed') and one line naming
    what happened and that a rerun resumes, never a traceback."""
    from distributed import Client

    def hold_pair_tasks_while(path):
        # On the worker (travels by value): pair tasks wait while the file exists.
        import os
        import time

        from smd_dist.engine import tasks

        real = tasks.compare_block

        def held(*args, **kwargs):
            deadline = time.monotonic() + 120
            while os.path.exists(path) and time.monotonic() < deadline:
                time.sleep(0.05)
            return real(*args, **kwargs)

        tasks.compare_block = held

    store, _ = workload
    env = {**os.environ, "DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT": "3s"}
    scheduler_file = tmp_path / "scheduler.json"
    scheduler = subprocess.Popen(
        [sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1",
         "--port", "0", "--dashboard-address", "127.0.0.1:0",
         "--scheduler-file", str(scheduler_file)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, start_new_session=True)
    worker = None
    try:
        deadline = time.monotonic() + 60
        while not scheduler_file.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        address = json.loads(scheduler_file.read_text())["address"]
        worker = subprocess.Popen(
            [sys.executable, "-m", "distributed.cli.dask_worker", address, "--nthreads", "1",
             "--no-nanny", "--no-dashboard"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
            start_new_session=True)
        gate = tmp_path / "hold"
        gate.touch()
        with Client(address, timeout="30s") as client:
            client.wait_for_workers(1, timeout=60)
            client.run(hold_pair_tasks_while, str(gate))
            output = tmp_path / "out"
            config = tmp_path / "run.yaml"
            config.write_text(f"store: {store.path}\noutput: {output}\n"
                              f"cluster: {{kind: address, address: '{address}'}}\n")
            run = cli("run", str(config), "--no-progress", env_extra=env)
            deadline = time.monotonic() + 120
            while run.poll() is None and time.monotonic() < deadline and not any(
                    str(k).startswith("block-") for ks in client.processing().values()
                    for k in ks):
                time.sleep(0.05)
            assert run.poll() is None, "the run ended before the scheduler could be lost"
        os.killpg(scheduler.pid, signal.SIGKILL)
        out, _ = run.communicate(timeout=120)
    finally:
        for proc in (scheduler, worker):
            if proc is not None and proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    lines = [line for line in out.splitlines() if line.strip()]
    assert run.returncode == 2, out
    assert "Traceback" not in out, out
    # Before the error only the line naming the scheduler and dashboard, at the start.
    assert all(line.startswith("smd-dist: scheduler") for line in lines[:-1]), out
    error = lines[-1]
    assert error.startswith("smd-dist") and "error" in error, out
    assert "lost the connection to the Dask scheduler" in error and "rerun" in error, out
