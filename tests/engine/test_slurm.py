"""The SLURM path on a real SLURM (scripts/slurm-up.sh): workers through sbatch, the demo
pipeline bit-identical to a local run, a job lost mid-run, and no job left behind.

Skipped, with the reason, where ``sbatch`` is absent. Where it is present but SLURM does not
answer, the tests fail: CI must not skip them silently.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time
import uuid
from collections import Counter

import dask.config
import numpy as np
import pytest
from click.testing import CliRunner

from smd_dist.cli import main
from smd_dist.engine.clusters import make_client

pytestmark = [
    pytest.mark.slurm,
    pytest.mark.skipif(
        shutil.which("sbatch") is None,
        reason="needs SLURM: sbatch is not on PATH (start one with scripts/slurm-up.sh)",
    ),
]


def _run(*cmd: str, timeout: float = 30) -> str:
    return subprocess.run(cmd, capture_output=True, text=True, check=True,
                          timeout=timeout).stdout


def _queued(job_ids=None, name=None) -> set[str]:
    args = ["squeue", "-h", "-o", "%i"]
    if name:
        args += ["-n", name]
    ids = set(_run(*args).split())
    return ids if job_ids is None else ids & set(job_ids)


def _wait_gone(job_ids=None, name=None, timeout: float = 30) -> set[str]:
    """Poll squeue until none of the jobs is listed; cancelled jobs linger as CG a while."""
    deadline = time.monotonic() + timeout
    while (left := _queued(job_ids, name)) and time.monotonic() < deadline:
        time.sleep(0.5)
    return left


@pytest.fixture(scope="module")
def partition():
    try:
        out = _run("sinfo", "-h", "-o", "%P %T", timeout=15)
    except (subprocess.SubprocessError, OSError) as err:
        pytest.fail(f"sbatch is present but SLURM does not answer (scripts/slurm-up.sh): {err}")
    lines = [line.split() for line in out.splitlines() if line.strip()]
    default = [p.rstrip("*") for p, _ in lines if p.endswith("*")] or [lines[0][0]]
    return default[0]


@pytest.fixture
def slurm_config(partition, tmp_path):
    """One-core, 1 GB jobs on loopback; lost jobs looked for every second."""
    return {
        "kind": "slurm",
        "jobs": 2,
        "cores": 1,
        "memory": "1GB",
        "queue": partition,
        "walltime": "00:10:00",
        "interface": "lo",
        "local-directory": str(tmp_path / "workers"),
        "log-directory": str(tmp_path / "logs"),
        "dashboard-address": ":0",
        "check-interval": "1s",
        "close-timeout": "30s",
        "name": f"smd-test-{uuid.uuid4().hex[:8]}",
    }


def test_workers_start_through_sbatch_and_compute(slurm_config):
    with make_client(slurm_config, quiet=True) as client:
        client.wait_for_workers(2, timeout=120)
        job_ids = client.cluster.job_ids
        assert len(job_ids) == 2
        states = dict(line.split() for line in _run("squeue", "-h", "-o", "%i %T").splitlines())
        assert all(states.get(j) == "RUNNING" for j in job_ids), states
        # Each worker runs inside its own SLURM job, single-threaded. (A function local to
        # the test travels by value: workers cannot import the test module.)
        def env_of_worker():
            return os.environ.get("OMP_NUM_THREADS"), os.environ.get("SLURM_JOB_ID")

        env = client.run(env_of_worker)
        assert {omp for omp, _ in env.values()} == {"1"}
        assert {job for _, job in env.values()} == set(job_ids)
        squares = client.map(lambda x: x * x, range(50))
        assert client.submit(sum, squares).result() == sum(x * x for x in range(50))
    # close() cancels and waits; the poll only absorbs a slow controller.
    assert not _wait_gone(job_ids), f"jobs still queued after close: {_queued(job_ids)}"


def test_tls_workers_start_through_sbatch_and_others_cannot_join(slurm_config, tmp_path):
    """`security: true`: the jobs' workers get the temporary certificates through files
    in shared-temp-directory and talk TLS; a client without them is refused."""
    from distributed import Security
    from test_clusters import refused

    cfg = {**slurm_config, "jobs": 1, "security": True,
           "shared-temp-directory": str(tmp_path)}
    with make_client(cfg, quiet=True) as client:
        client.wait_for_workers(1, timeout=120)
        assert client.scheduler.address.startswith("tls://")
        assert all(w.startswith("tls://") for w in client.scheduler_info()["workers"])
        assert client.submit(sum, [1, 2]).result() == 3
        keys = list(tmp_path.glob(".dask-jobqueue.worker.key.*"))
        assert keys and all(k.stat().st_mode & 0o077 == 0 for k in keys)
        address = client.scheduler.address
        assert refused(address.replace("tls://", "tcp://"))
        assert refused(address, Security.temporary())
        job_ids = client.cluster.job_ids
    assert not _wait_gone(job_ids)
    import gc

    gc.collect()
    assert not list(tmp_path.glob(".dask-jobqueue.worker.*"))  # the certificates are gone


def test_cli_job_script_has_the_directives_and_sbatch_accepts_it(slurm_config, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(
        "store: store\noutput: out\ncluster:\n"
        f"  kind: slurm\n  partition: {slurm_config['queue']}\n  cores: 1\n  memory: 1GB\n"
        "  walltime: '00:05:00'\n  job-extra-directives: ['--comment=smd-test']\n"
        "  lifetime: 4m\n  lifetime-stagger: 30s\n"
    )
    result = CliRunner().invoke(main, ["cluster", "job-script", str(config)])
    assert result.exit_code == 0, result.output
    script = result.output
    for line in (f"#SBATCH -p {slurm_config['queue']}", "#SBATCH -t 00:05:00",
                 "#SBATCH --comment=smd-test", "#SBATCH --cpus-per-task=1"):
        assert line in script.splitlines()
    assert "--lifetime 4m --lifetime-stagger 30s" in script
    path = tmp_path / "job.sh"
    path.write_text(script)
    # --test-only: SLURM validates the directives and schedules nothing.
    check = subprocess.run(["sbatch", "--test-only", str(path)], capture_output=True,
                           text=True, timeout=30)
    assert check.returncode == 0, check.stderr


# --- the demo pipeline -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    import smd_dist

    smd_dist.compute_distances  # noqa: B018 - the engine must exist for these tests
    from smd_dist.demo import build_demo

    root = tmp_path_factory.mktemp("demo")
    built = build_demo(root, small=True, progress=False)
    return {"digits": str(built.digits), "minilm": str(built.minilm), "root": root}


# For the cancelled run: one task per pair and frequent writes, so that the run lasts a
# while, some pairs are in the output and others in flight when a job is cancelled. The
# reference runs keep the default task grouping: values must not depend on it.
ONE_PAIR_PER_TASK = {"smd-dist.engine.max-pairs-per-task": 1,
                     "smd-dist.engine.task-entries": 0,
                     "smd-dist.engine.flush-seconds": 0.5}


@pytest.fixture(scope="module")
def local_results(demo):
    """Both demo stores on a local cluster: the reference matrices."""
    from smd_dist import compute_distances

    out = {}
    with make_client({"kind": "local", "n-workers": 2, "dashboard-address": ":0"},
                     quiet=True) as client:
        for name in ("digits", "minilm"):
            out[name] = compute_distances(
                demo[name], output=demo["root"] / f"{name}-local.zarr", client=client,
                progress=False,
            )
    return out


def _assert_identical(ds, ref):
    metrics = [v for v in ref.data_vars if "kind" in ref[v].attrs] or ["soft_matching"]
    assert list(ds.rep_a.values) == list(ref.rep_a.values)
    for name in metrics:
        np.testing.assert_array_equal(ds[name].values, ref[name].values)  # bit for bit
    # A pair the kernel cannot certify fails alike everywhere (the kernel's tests own that);
    # here the outcome must not depend on the cluster.
    assert ds.attrs["failed_pairs"] == ref.attrs["failed_pairs"]
    n = ds.sizes["rep_a"]
    assert ds.attrs["n_failed_pairs"] < n * (n - 1) // 20, ds.attrs["failed_pairs"]


@pytest.fixture
def written(monkeypatch):
    """Count, per pair key and output, the records the engine writes to the ledger.

    The engine compacts the ledger at the end of a run (one record per key survives), so
    duplicates are counted as they are flushed, not read back afterwards.
    """
    from smd_dist.engine.output import ResultsOutput

    counts: dict[str, Counter] = {}
    append = ResultsOutput.append

    def counting_append(self, records):
        keys = zip(
            (records.metrics[m] for m in records.column("metric")),
            (records.reps[a] for a in records.column("rep_a")),
            (records.hashes[a] for a in records.column("rep_a")),
            (records.reps[b] for b in records.column("rep_b")),
            (records.hashes[b] for b in records.column("rep_b")),
            strict=True,
        )
        counts.setdefault(str(self.path), Counter()).update(keys)
        return append(self, records)

    # The run's flushes go through ResultsOutput.append; the compaction at its end writes
    # through the ledger itself, and is not counted.
    monkeypatch.setattr(ResultsOutput, "append", counting_append)
    return counts


def _assert_each_pair_once(counts: Counter, ds):
    n = ds.sizes["rep_a"]
    metrics = [v for v in ds.data_vars if "kind" in ds[v].attrs] or ["soft_matching"]
    assert len(counts) == len(metrics) * n * (n - 1) // 2
    assert set(counts.values()) == {1}, {k: c for k, c in counts.items() if c != 1}


def test_demo_through_slurm_is_bit_identical_to_local(demo, local_results, slurm_config,
                                                       written):
    from smd_dist import compute_distances

    output = demo["root"] / "digits-slurm.zarr"
    ds = compute_distances(demo["digits"], output=output, cluster=slurm_config,
                           progress=False)
    _assert_identical(ds, local_results["digits"])
    _assert_each_pair_once(written[str(output)], ds)
    # The engine made and closed the cluster: none of its jobs is left.
    assert not _wait_gone(name=slurm_config["name"])


def test_scancel_mid_run_loses_and_duplicates_nothing(demo, local_results, slurm_config,
                                                      written, tmp_path):
    from smd_dist import compute_distances

    output = demo["root"] / "minilm-slurm.zarr"
    result: dict = {}
    gate = tmp_path / "hold-victim"
    with make_client(slurm_config, quiet=True) as client:
        cluster = client.cluster
        client.wait_for_workers(2, timeout=120)
        # The victim's pair tasks wait while the gate file exists, so the run cannot end
        # before its job is cancelled, however fast the machine; the other worker computes
        # and writes meanwhile. (Nested: a function local to the test travels by value.)
        victim_address = sorted(client.scheduler_info()["workers"])[0]
        victim = client.scheduler_info()["workers"][victim_address]["name"]

        def hold_pair_tasks_while(path):
            import os
            import time

            from smd_dist.engine import tasks

            real = tasks.compare_block

            def held(*args, **kwargs):
                deadline = time.monotonic() + 300
                while os.path.exists(path) and time.monotonic() < deadline:
                    time.sleep(0.05)
                return real(*args, **kwargs)

            tasks.compare_block = held

        gate.touch()
        client.run(hold_pair_tasks_while, str(gate), workers=[victim_address])

        def run():
            try:
                with dask.config.set(ONE_PAIR_PER_TASK):
                    result["ds"] = compute_distances(demo["minilm"], output=output,
                                                     client=client, progress=False)
            except BaseException as err:  # re-raised in the test thread
                result["error"] = err

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        # Mid-run: some pairs are in the output and the victim holds a pair task.
        deadline = time.monotonic() + 120
        ready = False
        while not ready and thread.is_alive() and time.monotonic() < deadline:
            held = client.processing().get(victim_address, ())
            ready = bool(written.get(str(output))) and any(
                str(k).startswith("block-") for k in held
            )
            if not ready:
                time.sleep(0.05)
        assert ready, "no pair was written while the victim held a pair task"
        n_before = sum(written[str(output)].values())
        # Only the id: a lost job's object must not be held (SpecCluster.close asserts).
        victim_job = cluster.workers[victim].job_id
        assert _queued([victim_job]) == {victim_job}
        _run("scancel", victim_job)
        gate.unlink()
        thread.join(timeout=150)
        assert not thread.is_alive(), "the run did not finish after a job was cancelled"
        if "error" in result:
            raise result["error"]
        # Fixed size: the lost job is replaced and the cluster is back to two workers.
        deadline = time.monotonic() + 60
        while len(client.scheduler_info()["workers"]) < 2 and time.monotonic() < deadline:
            time.sleep(0.5)
        assert victim_job in cluster.replaced_job_ids
        assert len(client.scheduler_info()["workers"]) == 2
        job_ids = cluster.job_ids
        assert len(job_ids) == 3
    assert victim_job not in _queued()
    _assert_identical(result["ds"], local_results["minilm"])
    _assert_each_pair_once(written[str(output)], result["ds"])
    assert 0 < n_before < sum(written[str(output)].values())
    assert not _wait_gone(job_ids), f"jobs still queued after close: {_queued(job_ids)}"
