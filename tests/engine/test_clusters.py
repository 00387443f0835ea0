"""Clusters from config (no SLURM needed): validation, local and address kinds, job scripts."""

from __future__ import annotations

import os

import dask.config
import dask.utils
import pytest
from click.testing import CliRunner

from smd_dist.cli import main
from smd_dist.config import ConfigError
from smd_dist.engine.clusters import (
    SINGLE_THREAD_ENV,
    default_layout,
    job_script,
    make_client,
    make_cluster,
    read_cluster_section,
    resolve_config,
)

SLURM = {
    "kind": "slurm",
    "cores": 2,
    "memory": "6GB",
    "walltime": "02:00:00",
    "queue": "gpu-short",
    "account": "lab-acct",
    "job_extra_directives": ["--gres=gpu:1"],
    "lifetime": "55m",
    "lifetime-stagger": "5m",
    "lifetime-restart": True,
}


# --- validation ---------------------------------------------------------------------------


def test_defaults_are_a_local_cluster():
    cfg = resolve_config(None)
    assert cfg["kind"] == "local"
    assert cfg["threads-per-worker"] is None and cfg["n-workers"] is None
    assert resolve_config({})["kind"] == "local"


@pytest.mark.parametrize(
    ("cores", "n_workers", "threads", "expected"),
    [
        (1, None, None, (1, 1)),
        (2, None, None, (1, 2)),
        (3, None, None, (3, 1)),
        (8, None, None, (4, 2)),
        (2, 2, None, (2, 1)),
        (8, 2, None, (2, 4)),
        (8, 16, None, (16, 1)),
        (8, None, 1, (8, 1)),
        (8, None, 3, (2, 3)),
        (2, None, 4, (1, 4)),
        (8, 3, 5, (3, 5)),
    ],
)
def test_default_layout_fills_the_cores(
    cores, n_workers, threads, expected
):
    assert default_layout(cores, n_workers=n_workers, threads=threads) == expected


def test_unknown_kind_names_it_and_suggests():
    with pytest.raises(ConfigError, match=r"unknown cluster kind 'slurn'.*did you mean 'slurm'"):
        resolve_config({"kind": "slurn"})


@pytest.mark.parametrize(
    ("key", "suggestion"),
    [("cors", "cores"), ("wall_time", "walltime"), ("n_worker", "n-workers"),
     ("lifetime_stager", "lifetime-stagger")],
)
def test_unknown_key_names_it_and_suggests(key, suggestion):
    spelt = key.replace("_", "-")
    with pytest.raises(ConfigError, match=rf"unknown key '{spelt}'.*'{suggestion}'"):
        resolve_config({"kind": "slurm", key: 1})


def test_underscores_and_partition_alias():
    cfg = resolve_config({"kind": "slurm", "job_extra_directives": "--gres=gpu:1",
                          "partition": "debug"})
    assert cfg["job-extra-directives"] == ["--gres=gpu:1"]
    assert cfg["queue"] == "debug"
    assert "partition" not in cfg
    with pytest.raises(ConfigError, match="both queue 'a' and partition 'b'"):
        resolve_config({"kind": "slurm", "queue": "a", "partition": "b"})
    with pytest.raises(ConfigError, match="'n-workers' twice"):
        resolve_config({"n-workers": 1, "n_workers": 2})


def test_keys_of_another_kind_are_accepted():
    # One file serves a laptop and SLURM: only `kind` changes.
    cfg = resolve_config({**SLURM, "kind": "local", "n-workers": 1})
    assert cfg["kind"] == "local" and cfg["cores"] == 2


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"jobs": -1}, r"'jobs' must be an integer >= 0, got -1"),
        ({"cores": "two"}, r"'cores' must be an integer >= 1, got 'two'"),
        ({"memory": "lots"}, r"'memory' must be an amount of memory.*'lots'"),
        ({"lifetime": "soon"}, r"'lifetime' must be a duration.*'soon'"),
        ({"lifetime-restart": "yes"}, r"'lifetime-restart' must be true or false"),
        ({"profiler": "on"}, r"'profiler' must be true or false, got 'on'"),
        ({"tick-interval": "often"}, r"'tick-interval' must be a duration.*'often'"),
        ({"job-extra-directives": [1]}, r"'job-extra-directives' must be a list of strings"),
        ({"adapt": 3}, r"'adapt' must be a mapping"),
        ({"adapt": {"minimun": 1, "maximum": 2}}, r"unknown key 'minimun'.*'minimum'"),
        ({"adapt": {"minimum": 3, "maximum": 2}}, r"maximum \(2\) must be at least"),
        ({"adapt": {"minimum": 1}}, r"'adapt' maximum must be an integer"),
    ],
)
def test_bad_values_are_named(extra, message):
    with pytest.raises(ConfigError, match=message):
        resolve_config({"kind": "slurm", **extra})


def test_bad_local_values_are_named():
    with pytest.raises(ConfigError, match=r"'n-workers' must be an integer >= 1, got 0"):
        resolve_config({"n-workers": 0})
    with pytest.raises(ConfigError, match=r"'memory-limit' must be 'auto'.*'much'"):
        resolve_config({"memory-limit": "much"})
    with pytest.raises(ConfigError, match="must be a mapping"):
        resolve_config(["local"])


def test_address_kind_needs_an_address_and_starts_no_cluster():
    with pytest.raises(ConfigError, match="kind 'address' needs 'address'"):
        resolve_config({"kind": "address"})
    with pytest.raises(ConfigError, match="there is no cluster to start"):
        make_cluster({"kind": "address", "address": "tcp://127.0.0.1:1"})


def test_defaults_come_from_dask_config():
    with dask.config.set({"smd-dist.cluster.n-workers": 3}):
        assert resolve_config({})["n-workers"] == 3
        assert resolve_config({"n-workers": 1})["n-workers"] == 1


def test_read_cluster_section(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("cluster:\n  kind: slurm\n  cores: 1\n")
    assert read_cluster_section(path) == {"kind": "slurm", "cores": 1}
    path.write_text("store: s\noutput: o\n")
    assert read_cluster_section(path) == {}
    path.write_text("clustr: {kind: slurm}\n")
    with pytest.raises(ConfigError, match=r"unknown key 'clustr'.*'cluster'"):
        read_cluster_section(path)
    with pytest.raises(ConfigError, match="does not exist"):
        read_cluster_section(tmp_path / "missing.yaml")


# --- job scripts (no sbatch needed) -----------------------------------------------------------


def test_job_script_has_the_configured_directives(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch, squeue or scancel reachable
    script = job_script(SLURM)
    lines = script.splitlines()
    assert "#SBATCH -p gpu-short" in lines
    assert "#SBATCH -A lab-acct" in lines
    assert "#SBATCH --cpus-per-task=2" in lines
    assert any(line.startswith("#SBATCH --mem=") for line in lines)
    assert "#SBATCH -t 02:00:00" in lines
    assert "#SBATCH --gres=gpu:1" in lines
    for name, value in SINGLE_THREAD_ENV.items():
        assert f"export {name}={value}" in lines
    # Workers read Dask settings from DASK_* variables: profiler off, a 1 s tick.
    assert "export DASK_DISTRIBUTED__WORKER__PROFILE__ENABLED=False" in lines
    assert "export DASK_DISTRIBUTED__ADMIN__TICK__INTERVAL=1s" in lines
    worker = lines[-1]
    assert "--lifetime 55m" in worker
    assert "--lifetime-stagger 5m" in worker
    assert "--lifetime-restart" in worker
    # The default layout on 2 cores: one worker process, two task threads.
    assert "--nthreads 2" in worker and "--nworkers" not in worker


def test_job_script_takes_resources_from_jobqueue_config():
    site = {"jobqueue.slurm.cores": 4, "jobqueue.slurm.memory": "16GB",
            "jobqueue.slurm.account": "site-acct", "jobqueue.slurm.queue": "normal",
            "jobqueue.slurm.job-extra-directives": ["--qos=long"]}
    with dask.config.set(site):
        lines = job_script({"kind": "slurm"}).splitlines()
        assert "#SBATCH -A site-acct" in lines
        assert "#SBATCH -p normal" in lines
        assert "#SBATCH --cpus-per-task=4" in lines
        assert "#SBATCH --qos=long" in lines
        # The run config overrides the site's values.
        lines = job_script({"kind": "slurm", "queue": "debug", "cores": 1,
                            "job-extra-directives": []}).splitlines()
        assert "#SBATCH -p debug" in lines
        assert "#SBATCH --cpus-per-task=1" in lines
        assert "#SBATCH --qos=long" not in lines
        assert "#SBATCH -A site-acct" in lines


def test_job_script_needs_cores_and_memory():
    with dask.config.set({"jobqueue.slurm.cores": None, "jobqueue.slurm.memory": None}):
        with pytest.raises(ConfigError, match=r"needs 'cores' and 'memory' per job.*jobqueue"):
            job_script({"kind": "slurm"})


def test_job_script_refuses_other_kinds_and_lone_stagger():
    with pytest.raises(ConfigError, match="only for cluster kind 'slurm'.*'local'"):
        job_script({"kind": "local"})
    with pytest.raises(ConfigError, match="'lifetime-stagger' and 'lifetime-restart' need"):
        job_script({"kind": "slurm", "cores": 1, "memory": "1GB", "lifetime-stagger": "5m"})


def test_cli_job_script(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(
        "store: s\noutput: o\ncluster:\n  kind: slurm\n  cores: 1\n  memory: 2GB\n"
        "  partition: debug\n  walltime: '00:20:00'\n  lifetime: 15m\n"
    )
    result = CliRunner().invoke(main, ["cluster", "job-script", str(path)])
    assert result.exit_code == 0, result.output
    assert "#SBATCH -p debug" in result.output
    assert "#SBATCH -t 00:20:00" in result.output
    assert "--lifetime 15m" in result.output
    path.write_text("cluster: {kind: local}\n")
    result = CliRunner().invoke(main, ["cluster", "job-script", str(path)])
    assert result.exit_code == 2
    assert "only for cluster kind 'slurm'" in result.output


# --- local and address kinds ----------------------------------------------------------------


def _thread_state():
    import torch

    return os.environ.get("OMP_NUM_THREADS"), os.environ.get("OPENBLAS_NUM_THREADS"), \
        torch.get_num_threads()


def test_local_client_has_single_threaded_worker_processes(capsys):
    cfg = {"kind": "local", "n-workers": 2, "threads-per-worker": 1, "dashboard-address": ":0"}
    with make_client(cfg) as client:
        workers = client.scheduler_info()["workers"]
        assert len(workers) == 2
        assert all(w["nthreads"] == 1 for w in workers.values())
        pids = set(client.run(os.getpid).values())
        assert len(pids) == 2 and os.getpid() not in pids  # separate processes
        # In the event loop (plugin) and in task threads alike.
        assert set(client.run(_thread_state).values()) == {("1", "1", 1)}
        futures = [client.submit(_thread_state, pure=False, workers=[w]) for w in workers]
        assert {f.result() for f in futures} == {("1", "1", 1)}
        assert client.submit(sum, [1, 2, 3]).result() == 6
        cluster_obj = client.cluster
    assert cluster_obj.status.name == "closed"
    assert "local cluster, 2 workers; dashboard http" in capsys.readouterr().err


def _thread_state_slowly():
    import threading
    import time

    time.sleep(0.2)  # long enough that the worker's other thread takes the next task
    return threading.get_ident(), _thread_state()


def test_one_local_worker_fills_the_cores_with_single_threaded_task_threads(capsys):
    cfg = {"kind": "local", "n-workers": 1, "dashboard-address": ":0"}
    with make_client(cfg) as client:
        (worker,) = client.scheduler_info()["workers"].values()
        assert worker["nthreads"] == default_layout(os.cpu_count() or 1, n_workers=1)[1]
        futures = [client.submit(_thread_state_slowly, pure=False) for _ in range(6)]
        seen = [f.result() for f in futures]
    assert {state for _, state in seen} == {("1", "1", 1)}
    if worker["nthreads"] > 1:
        assert len({ident for ident, _ in seen}) > 1  # both threads ran tasks
        n = worker["nthreads"]
        assert f"local cluster, 1 worker x {n} threads; dashboard" in capsys.readouterr().err


def _dask_settings_here():
    import dask.config

    return (
        dask.config.get("distributed.worker.profile.enabled"),
        dask.config.get("distributed.admin.tick.interval"),
    )


@pytest.mark.parametrize(("extra", "expected"), [({}, (False, "1s")),
                                                 ({"profiler": True, "tick-interval": "50ms"},
                                                  (True, "50ms"))])
def test_local_workers_get_the_dask_settings(extra, expected):
    cfg = {"kind": "local", "n-workers": 1, "dashboard-address": ":0", **extra}
    with make_client(cfg, quiet=True) as client:
        assert set(client.run(_dask_settings_here).values()) == {expected}
        scheduler = client.cluster.scheduler
        tick = dask.utils.parse_timedelta(expected[1])
        assert scheduler.periodic_callbacks["tick"].callback_time == tick * 1000


def test_address_client_connects_to_a_running_scheduler():
    from distributed import LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True,
                      dashboard_address=":0") as running:
        with make_client({"kind": "address", "address": running.scheduler_address},
                         quiet=True) as client:
            assert client.scheduler.address == running.scheduler_address
            assert client.submit(sum, [1, 2]).result() == 3
            assert set(client.run(_thread_state).values()) == {("1", "1", 1)}
        # The scheduler belongs to someone else: still running after the client closes.
        assert running.status.name == "running"


def test_make_cluster_local_sized_to_the_machine():
    from dask.system import CPU_COUNT

    with dask.config.set({"smd-dist.cluster.memory-limit": "1GB"}):
        with make_cluster({"dashboard-address": ":0"}) as local:
            processes, threads = default_layout(CPU_COUNT)
            assert len(local.workers) == processes
            spec = next(iter(local.worker_spec.values()))["options"]
            assert spec["nthreads"] == threads and spec["memory_limit"] == "1GB"

