"""Dask clusters from config: a local machine, an existing scheduler, or SLURM.

The run config's ``cluster:`` mapping chooses the kind; package defaults live in dask.config
under ``smd-dist.cluster`` (see ``smd_dist.yaml``). Keys may be spelt with ``-`` or ``_``.

``kind: local`` (default)
    A :class:`distributed.LocalCluster` sized to the machine: ``n-workers`` worker processes
    with ``threads-per-worker`` task threads each (default :func:`default_layout`: one
    process per two cores, two task threads each; given one of the two, the other fills
    the cores),
    ``memory-limit`` each (default ``auto``: the machine's memory divided among the
    processes). With ``worker-processes: false`` the cluster's one worker runs in the
    calling process instead, a task thread per core, and starts in a few milliseconds
    (no process to spawn, nothing to import again); :func:`compute_distances
    <smd_dist.engine.run.compute_distances>` chooses by its pairs when the key is
    ``auto`` (:func:`local_layout`).
``kind: address``
    A :class:`distributed.Client` connected to the scheduler at ``address``.
``kind: slurm``
    A :class:`dask_jobqueue.SLURMCluster`. Resources come from dask-jobqueue's own
    ``jobqueue.slurm`` config section, so a site's ``jobqueue.yaml`` applies unchanged; any
    of ``cores``, ``memory``, ``processes``, ``walltime``, ``queue`` (or ``partition``),
    ``account``, ``job-extra-directives``, ``job-script-prologue``, ``worker-extra-args``,
    ``interface``, ``local-directory``, ``log-directory``, ``python``, ``death-timeout``,
    ``job-cpu``, ``job-mem`` given here replaces the jobqueue value. ``lifetime``,
    ``lifetime-stagger`` and ``lifetime-restart`` add the worker options of the same names,
    so workers retire before the walltime, one at a time. Size: ``jobs: N`` (fixed) or
    ``adapt: {minimum: A, maximum: B}`` (in jobs).

Every task runs its numerical libraries single-threaded (BLAS, OpenMP, torch): one task
thread per core is the unit of parallelism, and results must not depend on thread counts.
The task threads of one worker process share the prepared reps it keeps
(:mod:`smd_dist.engine.worker_cache`), read from the store once per process rather than once per
core; the kernel releases the GIL in its heavy parts (POT, NumPy, torch).

Security: a cluster smd-dist starts binds its dashboard to 127.0.0.1 unless
``dashboard-address`` names a host (a local cluster's scheduler and workers listen on
127.0.0.1 too). A SLURM scheduler must listen where the nodes reach it, and Dask's TCP
has no authentication: anyone who reaches it can run code as you. ``security: true``
gives the scheduler, the workers and the client temporary TLS certificates (mutual
authentication and encryption; the workers' copy is written, readable by you only, to
``shared-temp-directory``); a :class:`distributed.Security` of your own can be passed to
:func:`make_client` (for ``kind: address`` that is the way to present certificates, or
Dask's ``distributed.comm.tls`` config). Values that reach a SLURM job script are checked:
no control characters (a newline would be a new shell line), a job name of letters,
digits, ``.``, ``_`` and ``-``, and worker options quoted where they hold shell syntax.

A fixed-size SLURM cluster stays at its size: a job that leaves SLURM's queue (walltime,
pre-emption, ``scancel``, a worker retiring at the end of its lifetime) is replaced. When
the cluster closes, every job it ever submitted is cancelled, and closing waits (bounded)
until none is listed by ``squeue`` any more.
"""

from __future__ import annotations

import ast
import asyncio
import contextlib
import getpass
import logging
import os
import re
import shlex
import shutil
import signal
import sys
import threading
import time
import urllib.parse
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from typing import Any

import dask.config
from dask.utils import parse_bytes, parse_timedelta
from distributed import Client
from distributed.diagnostics.plugin import WorkerPlugin

from smd_dist.config import ConfigError, check_keys, normalize_keys, suggest

logger = logging.getLogger(__name__)

KINDS = ("local", "address", "slurm")

#: Environment that keeps BLAS, OpenMP and friends to one thread in every worker process.
SINGLE_THREAD_ENV = {
    "OMP_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "VECLIB_MAXIMUM_THREADS": "1",
    "NUMEXPR_NUM_THREADS": "1",
}

# Keys of the run config's ``cluster:`` mapping, by the kind that reads them. A config may
# carry keys of other kinds (the same file serves a laptop and SLURM by changing ``kind``);
# keys of no kind are refused.
LOCAL_KEYS = {
    "worker-processes": "auto | true | false: pairs in worker processes, or in threads of "
    "the calling process (auto: worker processes for runs of many small pairs)",
    "n-workers": "worker processes (default: the cores / threads-per-worker)",
    "threads-per-worker": "task threads per worker process (default 2, or cores / n-workers)",
    "memory-limit": "memory per worker: auto, bytes ('4GB'), or a fraction of the machine",
    "dashboard-address": "dashboard address (default 127.0.0.1:8787; ':0' picks a free "
    "port on 127.0.0.1; '0.0.0.0:8787' opens it to the network; null: none)",
    "local-directory": "workers' scratch folder",
}
# Read by the kinds that start their own scheduler and workers (local, slurm).
DASK_KEYS = {
    "profiler": "Dask's statistical profiler in every worker (default false)",
    "tick-interval": "how often Dask's event loops wake to check they are not blocked",
    "security": "true: TLS with temporary certificates between scheduler, workers and "
    "client (default false)",
}
ADDRESS_KEYS = {"address": "scheduler address, e.g. tcp://10.0.0.5:8786"}
# Keys passed to dask-jobqueue as they are; unset ones come from ``jobqueue.slurm``.
SLURM_JOBQUEUE_KEYS = {
    "cores": "cores per job",
    "memory": "memory per job, e.g. '16GB'",
    "processes": "worker processes per job (default: one per two cores, two threads each)",
    "walltime": "job walltime, e.g. '02:00:00'",
    "queue": "SLURM partition (-p)",
    "account": "SLURM account (-A)",
    "job-extra-directives": "extra #SBATCH lines, e.g. ['--gres=gpu:1']",
    "job-script-prologue": "shell lines run before the worker starts",
    "worker-extra-args": "extra dask worker options",
    "interface": "network interface of scheduler and workers, e.g. ib0",
    "local-directory": "workers' scratch folder on the node",
    "log-directory": "folder for the jobs' output files",
    "python": "python executable on the nodes (default: this one)",
    "death-timeout": "seconds a worker waits for an unreachable scheduler",
    "job-cpu": "--cpus-per-task if it differs from cores",
    "job-mem": "--mem if it differs from memory",
    "name": "job name (-J) and worker name prefix",
}
SLURM_KEYS = {
    **SLURM_JOBQUEUE_KEYS,
    "partition": "alias of queue",
    "lifetime": "workers retire after this long, e.g. '55m' (keep it below walltime)",
    "lifetime-stagger": "random spread of lifetimes, e.g. '5m', so workers leave one by one",
    "lifetime-restart": "restart a retired worker inside the same job (bool)",
    "jobs": "fixed number of jobs; lost jobs are replaced",
    "adapt": "{minimum: A, maximum: B} jobs, instead of a fixed number",
    "dashboard-address": "dashboard address of the scheduler (default 127.0.0.1:8787)",
    "shared-temp-directory": "folder the nodes can read where security: true writes the "
    "workers' certificates (default: jobqueue's, else ~)",
    "check-interval": "how often lost jobs are looked for, e.g. '10s'",
    "close-timeout": "how long closing waits for the jobs to leave squeue, e.g. '60s'",
}
VALID_KEYS = {
    "kind": "local | address | slurm",
    **LOCAL_KEYS,
    **DASK_KEYS,
    **ADDRESS_KEYS,
    **SLURM_KEYS,
}
ADAPT_KEYS = {"minimum": "fewest jobs", "maximum": "most jobs"}
#: The keys each kind reads.
KIND_KEYS = {
    "local": {**LOCAL_KEYS, **DASK_KEYS},
    "address": ADDRESS_KEYS,
    "slurm": {**SLURM_KEYS, **DASK_KEYS},
}

#: Most task threads per worker process when neither ``n-workers`` nor
#: ``threads-per-worker`` is set. The threads of a process share the reps it keeps, so each
#: process reads, prepares and derives from each rep once for all of them; the kernel holds
#: the GIL about 7 % of its time (py-spy ``--gil`` over the benchmark's 120 pairs), so two
#: threads rarely wait for it. On the engine benchmark (2 cores, three runs on 2026-12-03,
#: each the faster of two) one process with two threads took 4.24-4.37 s against
#: 4.98-5.34 s for two single-threaded processes (the workers' reading and preparing 0.6-0.7
#: against 1.4-1.9 s), with 820-848 MiB against 2 x 763-778 MiB; in earlier runs the two
#: were within 3 %, threads ahead in 9 of 11 alternating pairs of fresh clusters. More
#: threads per process were not measured (two cores), hence the cap.
THREADS_PER_WORKER = 2

#: Pairs below this many cost entries (``N_a·N_b``) hold the GIL most of their time
#: (bookkeeping in Python around small NumPy and POT calls), so threads of one process
#: solve them one at a time.
GIL_BOUND_ENTRIES = 96 * 96
#: From this many GIL-bound pairs, ``worker-processes: auto`` starts one single-threaded
#: worker process per core: the seconds they save outweigh the seconds a worker process
#: takes to start and import the kernel.
PROCESSES_FROM_PAIRS = 40_000

# Stands in for the scheduler's address, known only once a cluster starts.
SCHEDULER_PLACEHOLDER = "tcp://<insert-scheduler-address-here>:8786"
#: Where a dashboard listens when the config names no host: this machine only.
LOCALHOST = "127.0.0.1"
DEFAULT_DASHBOARD = f"{LOCALHOST}:8787"
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_JOB_NAME = re.compile(r"[A-Za-z0-9._-]+")
# Shell syntax that would run something in a worker's command line: quoted. Variables
# ($TMPDIR) and ~ keep working.
_SHELL_SYNTAX = re.compile(r"[;&|<>`'\"\\\s]|\$\(")


# --- configuration ------------------------------------------------------------------------


def resolve_config(cluster_config: Mapping[str, Any] | None = None) -> dict:
    """Merge a run config's ``cluster:`` mapping over the defaults and validate it.

    Parameters
    ----------
    cluster_config
        The ``cluster:`` mapping of a run config, or ``None`` for the defaults
        (``smd-dist.cluster`` in dask.config).

    Returns
    -------
    dict
        Keys spelt with ``-``; ``partition`` folded into ``queue``.

    Raises
    ------
    ConfigError
        An unknown kind or key (with the closest valid one), or a value of the wrong type.
    """
    if cluster_config is None:
        cluster_config = {}
    if not isinstance(cluster_config, Mapping):
        raise ConfigError(
            f"cluster config must be a mapping of keys to values, "
            f"got {type(cluster_config).__name__}: {cluster_config!r}"
        )
    user = normalize_keys(cluster_config, where="cluster config")
    check_keys(user, VALID_KEYS, where="cluster config")
    defaults = normalize_keys(
        dask.config.get("smd-dist.cluster", default={}) or {}, where="cluster config"
    )
    cfg = {**{k: v for k, v in defaults.items() if k in VALID_KEYS}, **user}

    kind = cfg.get("kind") or "local"
    if kind not in KINDS:
        raise ConfigError(
            f"unknown cluster kind {kind!r}{suggest(kind, KINDS)}; "
            f"valid kinds: {', '.join(KINDS)}"
        )
    cfg["kind"] = kind

    if "partition" in user:
        if user.get("queue") not in (None, user["partition"]):
            raise ConfigError(
                f"cluster config sets both queue {user['queue']!r} and partition "
                f"{user['partition']!r}; they are the same setting, give one"
            )
        cfg["queue"] = cfg.pop("partition")
    cfg.pop("partition", None)

    _check_values(cfg)
    if kind == "address" and not cfg.get("address"):
        raise ConfigError("cluster kind 'address' needs 'address', e.g. tcp://10.0.0.5:8786")
    return cfg


def read_cluster_section(path: str | os.PathLike) -> dict:
    """The ``cluster:`` mapping of a run config file (``{}`` when it has none).

    Checks the file's top-level keys like :func:`smd_dist.config.load_run_config` but does
    not require ``store`` or ``output``, so a file holding only a cluster section works.

    Raises
    ------
    ConfigError
        The file is missing, not YAML, not a mapping, or has unknown keys.
    """
    from smd_dist.config import read_config_file

    cfg = read_config_file(path)
    section = cfg.get("cluster") or {}
    if not isinstance(section, dict):
        raise ConfigError(
            f"'cluster' in run config {str(path)!r} must be a mapping, got {section!r}"
        )
    return section


def _positive_int(cfg: dict, key: str, *, minimum: int = 1) -> None:
    value = cfg.get(key)
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"cluster {key!r} must be an integer >= {minimum}, got {value!r}")


def _check_values(cfg: dict) -> None:
    for key in ("n-workers", "threads-per-worker", "cores", "processes", "job-cpu"):
        _positive_int(cfg, key)
    _positive_int(cfg, "jobs", minimum=0)
    for key in ("memory", "job-mem"):
        if cfg.get(key) is not None:
            try:
                parse_bytes(cfg[key])
            except (ValueError, TypeError) as err:
                raise ConfigError(
                    f"cluster {key!r} must be an amount of memory such as '16GB', "
                    f"got {cfg[key]!r}"
                ) from err
    limit = cfg.get("memory-limit")
    if limit not in (None, "auto", 0) and not isinstance(limit, float):
        try:
            parse_bytes(limit)
        except (ValueError, TypeError) as err:
            raise ConfigError(
                f"cluster 'memory-limit' must be 'auto', an amount such as '4GB', or a "
                f"fraction of the machine's memory, got {limit!r}"
            ) from err
    durations = "lifetime", "lifetime-stagger", "check-interval", "close-timeout", "tick-interval"
    for key in durations:
        if cfg.get(key) is not None:
            try:
                parse_timedelta(cfg[key])
            except (ValueError, TypeError, KeyError) as err:
                raise ConfigError(
                    f"cluster {key!r} must be a duration such as '55m' or '30s', "
                    f"got {cfg[key]!r}"
                ) from err
    for key in ("lifetime-restart", "profiler", "security"):
        if cfg.get(key) not in (None, True, False):
            raise ConfigError(f"cluster {key!r} must be true or false, got {cfg[key]!r}")
    if cfg.get("worker-processes") not in (None, "auto", True, False):
        raise ConfigError(
            f"cluster 'worker-processes' must be auto, true or false, got "
            f"{cfg['worker-processes']!r}"
        )
    for key in ("job-extra-directives", "job-script-prologue", "worker-extra-args"):
        value = cfg.get(key)
        if isinstance(value, str):
            cfg[key] = [value]
        elif value is not None and not (
            isinstance(value, list | tuple) and all(isinstance(v, str) for v in value)
        ):
            raise ConfigError(f"cluster {key!r} must be a list of strings, got {value!r}")
    for key, value in cfg.items():
        _check_job_script_value(key, value)
    adapt = cfg.get("adapt")
    if adapt is not None:
        if not isinstance(adapt, Mapping):
            raise ConfigError(
                f"cluster 'adapt' must be a mapping {{minimum: A, maximum: B}}, got {adapt!r}"
            )
        check_keys(adapt, ADAPT_KEYS, where="cluster 'adapt'")
        lo, hi = adapt.get("minimum", 0), adapt.get("maximum")
        for name, value in (("minimum", lo), ("maximum", hi)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(
                    f"cluster 'adapt' {name} must be an integer >= 0, got {value!r}"
                )
        if hi < max(lo, 1):
            raise ConfigError(
                f"cluster 'adapt' maximum ({hi}) must be at least 1 and at least "
                f"minimum ({lo})"
            )


def _check_job_script_value(key: str, value: Any) -> None:
    """Refuse what would change a job script's shape: a control character (a newline is a
    new shell line) in any string, a job name that is not one plain word, worker options
    that the shell cannot split."""
    items = value if isinstance(value, list | tuple) else [value]
    for item in items:
        if isinstance(item, str) and _CONTROL.search(item):
            raise ConfigError(
                f"cluster {key!r} must not hold control characters (newlines, tabs, NUL): "
                f"got {value!r}"
            )
    if key == "name" and value is not None and not (
        isinstance(value, str) and _JOB_NAME.fullmatch(value)
    ):
        raise ConfigError(
            f"cluster 'name' must be letters, digits, '.', '_' and '-' only, got {value!r}"
        )
    if key == "worker-extra-args" and value is not None:
        for item in items:
            try:
                shlex.split(item)
            except ValueError as err:
                raise ConfigError(f"cluster 'worker-extra-args' item {item!r}: {err}") from err


def quoted_worker_args(args: list[str]) -> list[str]:
    """Worker options as words of a shell command line: each item is split as the shell
    would, and a word holding shell syntax (``;``, ``|``, ``$(...)``, quotes, spaces) is
    quoted, so it reaches the worker as one literal argument and runs nothing.

    >>> quoted_worker_args(["--resources GPU=1;x", "--local-directory", "$TMPDIR"])
    ['--resources', "'GPU=1;x'", '--local-directory', '$TMPDIR']
    """
    return [
        shlex.quote(word) if _SHELL_SYNTAX.search(word) else word
        for item in args
        for word in shlex.split(item)
    ]


def dashboard_link(client: Client, cfg: Mapping[str, Any]) -> str:
    """The dashboard's link where a cluster smd-dist started binds it to one host.

    Dask builds the link from the scheduler's host; a scheduler in this process
    (``inproc://``) names the machine's network address there, where a dashboard bound to
    ``127.0.0.1`` does not answer. The port is Dask's (it picks another when one is taken).
    """
    link = client.dashboard_link
    if cfg.get("kind") != "local" or cfg.get("dashboard-address", "") is None:
        return link
    host = dashboard_address(cfg.get("dashboard-address")).rpartition(":")[0]
    if host in ("", "0.0.0.0", "[::]", "::"):
        return link
    parts = urllib.parse.urlsplit(link)
    if parts.port is None:
        return link
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{host}:{parts.port}"))


def dashboard_address(value: str | int | None) -> str:
    """Where a dashboard listens: ``value`` with ``127.0.0.1`` as its host when it names
    none (``":8787"``, ``"8787"``, ``":0"``); ``None`` gives ``127.0.0.1:8787``.

    A host given (``"0.0.0.0:8787"``) is kept: opening the dashboard to the network is
    then the config's explicit choice.
    """
    if value is None:
        return DEFAULT_DASHBOARD
    text = str(value)
    if text.isdigit():
        return f"{LOCALHOST}:{text}"
    if text.startswith(":"):
        return f"{LOCALHOST}{text}"
    return text


def default_layout(
    cores: int, *, n_workers: int | None = None, threads: int | None = None
) -> tuple[int, int]:
    """``(worker processes, task threads each)`` for ``cores`` cores.

    Given both, they are kept; given one, the other fills the cores (at least 1), as
    Dask's ``LocalCluster`` does; given neither, the largest number of threads up to
    :data:`THREADS_PER_WORKER` that divides the cores, so that processes × threads = cores
    (two-threaded processes on an even count, single-threaded ones on an odd count).
    """
    cores = max(1, int(cores))
    if n_workers and threads:
        return int(n_workers), int(threads)
    if n_workers:
        return int(n_workers), max(1, cores // int(n_workers))
    if not threads:
        threads = max(t for t in range(1, THREADS_PER_WORKER + 1) if cores % t == 0)
    return max(1, cores // int(threads)), int(threads)


def local_layout(cfg: Mapping[str, Any], *, gil_bound_pairs: int = 0) -> dict:
    """``cfg`` (a resolved ``kind: local`` config) with its layout decided for a run.

    ``worker-processes: auto`` (or unset) becomes ``false`` — one worker in the calling
    process with a task thread per core — unless the config sets ``n-workers`` or
    ``threads-per-worker`` (they describe worker processes) or the run has at least
    :data:`PROCESSES_FROM_PAIRS` pairs below :data:`GIL_BOUND_ENTRIES` cost entries
    (``gil_bound_pairs``): then ``true``, with one single-threaded process per core unless
    the config says otherwise. ``true`` and ``false`` are kept.
    """
    from dask.system import CPU_COUNT

    cfg = dict(cfg)
    choice = cfg.get("worker-processes")
    explicit = cfg.get("n-workers") or cfg.get("threads-per-worker")
    if choice in (None, "auto"):
        choice = bool(explicit) or gil_bound_pairs >= PROCESSES_FROM_PAIRS
        if choice and not explicit:
            cfg["n-workers"], cfg["threads-per-worker"] = CPU_COUNT, 1
    cfg["worker-processes"] = choice
    return cfg


# --- workers: single-threaded numerics ------------------------------------------------------


def _limit_threads() -> int:
    """Hold BLAS/OpenMP/torch to one thread in this process; return torch's thread count."""
    os.environ.update(SINGLE_THREAD_ENV)
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - a dependency of scikit-learn, usually present
        pass
    else:
        threadpool_limits(1)
    # torch reads OMP_NUM_THREADS when first imported; only a torch already loaded needs
    # telling (importing it here would cost every worker seconds at start-up).
    torch = sys.modules.get("torch")
    if torch is None:
        return 1
    torch.set_num_threads(1)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # only settable before the first inter-op parallel work
        pass
    return torch.get_num_threads()


@contextmanager
def _single_threaded_here() -> Iterator[None]:
    """BLAS, OpenMP and torch held to one thread in this process while the block runs
    (:func:`_limit_threads`, for a worker in this process), as they were after it."""
    environ = {key: os.environ.get(key) for key in SINGLE_THREAD_ENV}
    torch = sys.modules.get("torch")
    torch_threads = torch.get_num_threads() if torch is not None else None
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - a dependency of scikit-learn, usually present
        limits = None
    else:
        limits = threadpool_limits(1)
    try:
        yield
    finally:
        if limits is not None:
            limits.restore_original_limits()
        if torch_threads is not None:
            torch.set_num_threads(torch_threads)
        for key, value in environ.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


class SingleThreaded(WorkerPlugin):
    """Worker plugin: one thread for BLAS, OpenMP and torch, in the event loop and in tasks.

    The environment variables (:data:`SINGLE_THREAD_ENV`) are set before a worker process
    starts where smd-dist starts it; this plugin also covers workers started by others
    (``kind: address``) and threads created later.
    """

    name = "smd-dist-single-threaded"

    async def setup(self, worker) -> None:
        _limit_threads()
        # torch keeps its thread count per OS thread: also set it in the task threads.
        loop = asyncio.get_running_loop()
        executor = worker.executors.get("default")
        if executor is not None:
            await loop.run_in_executor(executor, _limit_threads)


def dask_settings(cfg: Mapping[str, Any]) -> dict:
    """The Dask settings a cluster smd-dist starts gets (scheduler, nannies, workers).

    Off by default, Dask's statistical profiler samples every task thread each 10 ms, and
    every scheduler, nanny and worker event loop wakes each 20 ms (``tick``): on a 2-core
    machine the two together took a fifth of a core with the cluster idle, time taken from
    the solves. ``profiler: true`` brings back the dashboard's Profile page.
    """
    settings = {"distributed.worker.profile.enabled": bool(cfg.get("profiler"))}
    if cfg.get("tick-interval") is not None:
        settings["distributed.admin.tick.interval"] = cfg["tick-interval"]
    return settings


def _settings_environ(settings: Mapping[str, Any]) -> dict:
    """``settings`` as the ``DASK_*`` environment variables a worker process reads."""
    return {
        "DASK_" + key.upper().replace(".", "__").replace("-", "_"): str(value)
        for key, value in settings.items()
    }


# --- local ---------------------------------------------------------------------------------


class MainGuardError(RuntimeError):
    """A script would start a local cluster from code its worker processes run again."""


def unguarded_main_call() -> tuple[str, int] | None:
    """``(script, line)`` where the ``__main__`` script calls into smd-dist outside an
    ``if __name__ == "__main__":`` block, when worker processes would import it again.

    A local cluster's worker processes are started with ``spawn`` (Dask's default
    ``distributed.worker.multiprocessing-method``): each imports the ``__main__`` script
    again, as multiprocessing does (``multiprocessing.spawn``), and so runs every
    unguarded line, which would start a cluster of its own. ``None`` when nothing would
    be re-run: an interactive session or notebook, ``python -m package``, a call under
    the guard, ``fork`` workers, or a source that cannot be read.
    """
    method = dask.config.get("distributed.worker.multiprocessing-method", "spawn")
    if method == "fork":
        return None
    main = sys.modules.get("__main__")
    spec_name = getattr(getattr(main, "__spec__", None), "name", None)
    if spec_name == "__main__" or (spec_name or "").endswith(".__main__"):
        return None  # multiprocessing never re-runs a package's __main__
    frame, site = sys._getframe(1), None
    while frame is not None:
        if frame.f_code.co_name == "<module>" and frame.f_globals.get("__name__") in (
            "__main__",
            "__mp_main__",
        ):
            site = frame
        frame = frame.f_back
    if site is None:
        return None
    path, line = site.f_code.co_filename, site.f_lineno
    if site.f_globals.get("__name__") == "__mp_main__":
        return path, line  # this is a worker process re-running the script
    if os.path.splitext(os.path.basename(path))[0] == "ipython":
        return None
    try:
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), path)
    except (OSError, SyntaxError, ValueError):
        return None
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and _is_main_test(node.test) and node.body:
            if node.body[0].lineno <= line <= (node.body[-1].end_lineno or line):
                return None
    return path, line


def _is_main_test(test: ast.expr) -> bool:
    """``__name__ == "__main__"``, either way round."""
    if not (isinstance(test, ast.Compare) and len(test.ops) == 1
            and isinstance(test.ops[0], ast.Eq)):
        return False
    sides = (test.left, test.comparators[0])
    names = [s.id for s in sides if isinstance(s, ast.Name)]
    values = [s.value for s in sides if isinstance(s, ast.Constant)]
    return names == ["__name__"] and values == ["__main__"]


def refuse_unguarded_main(what: str = "compute_distances") -> None:
    """Raise :class:`MainGuardError` where :func:`unguarded_main_call` finds the trap."""
    found = unguarded_main_call()
    if found is None:
        return
    path, line = found
    name = os.path.basename(path)
    raise MainGuardError(
        f"{name}, line {line}, starts {what} outside `if __name__ == \"__main__\":`. "
        f"Its local cluster's worker processes import {name} again and would each start "
        f"a run of their own. Put the code that runs smd-dist under the guard:\n\n"
        f"    if __name__ == \"__main__\":\n"
        f"        ...  # the code from line {line}\n"
    )


@contextmanager
def _workers_ignore_ctrl_c() -> Iterator[None]:
    """Worker processes started in this block ignore SIGINT.

    Ctrl-C in a terminal reaches every process of the foreground group, workers
    included, and each would print a traceback of whatever task it was in. A signal
    ignored when a process starts stays ignored through ``exec`` and Python's start,
    so only this process sees Ctrl-C, and it shuts the workers down. (Only the main
    thread may change signal handling; elsewhere nothing changes.)
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _dashboard_option(cfg: Mapping[str, Any]) -> str | None:
    """The dashboard address for a cluster smd-dist starts (``null`` in the config: none)."""
    if "dashboard-address" in cfg and cfg["dashboard-address"] is None:
        return None
    return dashboard_address(cfg.get("dashboard-address"))


def _make_local(cfg: dict, security=None):
    from dask.system import CPU_COUNT
    from distributed import LocalCluster

    refuse_unguarded_main("a local Dask cluster")

    processes = cfg.get("worker-processes") is not False
    if processes:
        n_workers, threads = default_layout(
            CPU_COUNT, n_workers=cfg.get("n-workers"), threads=cfg.get("threads-per-worker")
        )
    else:
        n_workers, threads = 1, cfg.get("threads-per-worker") or CPU_COUNT
    kwargs: dict[str, Any] = {
        "n_workers": n_workers,
        "threads_per_worker": threads,
        "processes": processes,
        "memory_limit": cfg.get("memory-limit", "auto"),
    }
    if not processes:
        # A worker in this process talks to the scheduler in memory (inproc://), so it has no
        # host to bind its HTTP server (health, metrics) to, and Dask takes every interface.
        kwargs["worker_dashboard_address"] = f"{LOCALHOST}:0"
    kwargs["dashboard_address"] = _dashboard_option(cfg)
    if security is None and cfg.get("security"):
        security = True
    kwargs["security"] = security
    if cfg.get("local-directory"):
        kwargs["local_directory"] = cfg["local-directory"]
    # The nanny applies pre-spawn-environ before the worker process imports numpy or torch,
    # and keeps it for restarts.
    env = {**dask.config.get("distributed.nanny.pre-spawn-environ", default={})}
    env.update(SINGLE_THREAD_ENV)
    # The scheduler reads its settings when it starts, the nannies hand theirs to the
    # worker processes they spawn (and respawn).
    with (
        dask.config.set({"distributed.nanny.pre-spawn-environ": env, **dask_settings(cfg)}),
        _workers_ignore_ctrl_c(),
        warnings.catch_warnings(),
    ):
        # Dask picks another dashboard port by itself; the link printed says which.
        warnings.filterwarnings("ignore", "Port .* is already in use", UserWarning)
        return LocalCluster(**kwargs)


# --- slurm ---------------------------------------------------------------------------------


def _jobqueue(key: str) -> Any:
    import dask_jobqueue  # noqa: F401  - registers the jobqueue config defaults

    return dask.config.get(f"jobqueue.slurm.{key}", default=None)


def slurm_job_kwargs(cfg: Mapping[str, Any]) -> dict:
    """Keyword arguments for :class:`dask_jobqueue.SLURMCluster` / ``SLURMJob``.

    Keys set in ``cfg`` replace the ``jobqueue.slurm`` values; the rest are left to
    dask-jobqueue, which reads ``jobqueue.slurm`` itself. Two additions: ``processes``
    follows :func:`default_layout` (one two-threaded worker process per two cores) when
    neither sets it, and the job script exports :data:`SINGLE_THREAD_ENV` before the
    workers start.

    Raises
    ------
    ConfigError
        ``cores`` or ``memory`` set neither here nor in ``jobqueue.slurm``.
    """
    kwargs: dict[str, Any] = {}
    for key in SLURM_JOBQUEUE_KEYS:
        if cfg.get(key) is not None:
            kwargs[key.replace("-", "_")] = cfg[key]
    # The site's jobqueue values reach the script too: they pass the same checks.
    for key in ("job-extra-directives", "job-script-prologue", "worker-extra-args", "name",
                "queue", "account", "walltime", "python", "interface", "local-directory",
                "log-directory"):
        if cfg.get(key) is None:
            _check_job_script_value(key, _jobqueue(key))
    if cfg.get("name") is not None:
        # dask-jobqueue's ``name`` keyword names the cluster; the job name is job_name.
        kwargs["job_name"] = kwargs.pop("name")

    cores = kwargs.get("cores", _jobqueue("cores"))
    memory = kwargs.get("memory", _jobqueue("memory"))
    missing = [k for k, v in (("cores", cores), ("memory", memory)) if v is None]
    if missing:
        raise ConfigError(
            f"cluster kind 'slurm' needs {' and '.join(repr(m) for m in missing)} per job: "
            f"set them in the run config's cluster section or in dask-jobqueue's "
            f"jobqueue.slurm config (e.g. ~/.config/dask/jobqueue.yaml)"
        )
    if kwargs.get("processes") is None and _jobqueue("processes") is None:
        kwargs["processes"] = default_layout(int(cores))[0]

    extra_args = list(
        cfg["worker-extra-args"]
        if cfg.get("worker-extra-args") is not None
        else _jobqueue("worker-extra-args") or []
    )
    if cfg.get("lifetime"):
        extra_args += ["--lifetime", str(cfg["lifetime"])]
        if cfg.get("lifetime-stagger"):
            extra_args += ["--lifetime-stagger", str(cfg["lifetime-stagger"])]
        if cfg.get("lifetime-restart"):
            extra_args.append("--lifetime-restart")
    elif cfg.get("lifetime-stagger") or cfg.get("lifetime-restart"):
        raise ConfigError(
            "cluster 'lifetime-stagger' and 'lifetime-restart' need 'lifetime', e.g. '55m'"
        )
    kwargs["worker_extra_args"] = quoted_worker_args(extra_args)

    prologue = list(
        cfg["job-script-prologue"]
        if cfg.get("job-script-prologue") is not None
        else _jobqueue("job-script-prologue") or []
    )
    environ = {**SINGLE_THREAD_ENV, **_settings_environ(dask_settings(cfg))}
    prologue += [f"export {k}={v}" for k, v in environ.items()]
    kwargs["job_script_prologue"] = prologue
    return kwargs


def job_script(cluster_config: Mapping[str, Any] | None) -> str:
    """The batch script a ``kind: slurm`` cluster would submit for each job.

    Needs neither SLURM nor a running scheduler: the scheduler's address appears as
    ``tcp://<insert-scheduler-address-here>:8786`` and each job's worker name as
    ``dummy-name``, as in :meth:`dask_jobqueue.SLURMCluster.job_script`.

    Raises
    ------
    ConfigError
        The config is invalid, or its kind is not ``slurm``.
    """
    cfg = resolve_config(cluster_config)
    if cfg["kind"] != "slurm":
        raise ConfigError(
            f"a job script exists only for cluster kind 'slurm'; this config has kind "
            f"{cfg['kind']!r}"
        )
    from dask_jobqueue.slurm import SLURMJob

    kwargs = slurm_job_kwargs(cfg)
    if cfg.get("interface") is None and _jobqueue("interface") is None:
        kwargs.pop("interface", None)
    address = SCHEDULER_PLACEHOLDER
    if cfg.get("security"):
        from distributed import Security

        # The certificates exist only once the cluster starts: their files stand in.
        folder = _shared_temp_directory(cfg)
        kwargs["protocol"] = "tls://"
        kwargs["security"] = Security(
            tls_ca_file=f"{folder}/<ca-file>",
            tls_worker_cert=f"{folder}/<worker-cert-file>",
            tls_worker_key=f"{folder}/<worker-key-file>",
            require_encryption=True,
        )
        address = address.replace("tcp://", "tls://")
    try:
        job = SLURMJob(address, name="dummy-name", **kwargs)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"cluster config cannot make a SLURM job: {err}") from err
    return job.job_script()


def _slurm_cluster_class():
    """Build the SLURMCluster subclass lazily, so importing smd_dist needs no dask-jobqueue."""
    global _SLURM_CLASS
    if _SLURM_CLASS is not None:
        return _SLURM_CLASS

    from dask_jobqueue import SLURMCluster
    from distributed.core import Status
    from distributed.deploy.cluster import Cluster
    from tornado.ioloop import PeriodicCallback

    class KeptSLURMCluster(SLURMCluster):
        """SLURMCluster that replaces lost jobs and leaves no job behind when it closes.

        SLURM's queue is the truth about a job: a job that has left ``squeue`` (walltime,
        pre-emption, ``scancel``, its workers retired) is dropped and, at a fixed size,
        replaced. dask's own rule (a worker that disconnected for
        ``distributed.deploy.lost-worker-timeout``) is switched off: it cannot see jobs of
        several worker processes, and it would cancel a replacement that reuses the lost
        job's name before that replacement connects.

        Only job ids are kept, never lost job objects: ``SpecCluster.close`` asserts that
        every job object still alive has been closed.
        """

        def __init__(
            self,
            *,
            keep_jobs: int | None = None,
            check_interval: float = 10.0,
            close_timeout: float = 60.0,
            **kwargs,
        ):
            self._keep_jobs = keep_jobs
            self._check_interval = check_interval
            self._close_timeout = close_timeout
            self._job_ids: list[str] = []
            self._replaced: list[str] = []
            self._checking = None
            super().__init__(**kwargs)
            self.loop.add_callback(self._start_checking)

        @property
        def job_ids(self) -> tuple[str, ...]:
            """Ids of every job this cluster submitted, in order."""
            self._note_job_ids()
            return tuple(self._job_ids)

        @property
        def replaced_job_ids(self) -> tuple[str, ...]:
            """Ids of the jobs that were found gone from SLURM and replaced or dropped."""
            return tuple(self._replaced)

        def _update_worker_status(self, op, msg):
            # Skip SpecCluster's lost-worker rule (see the class docstring).
            Cluster._update_worker_status(self, op, msg)

        def _note_job_ids(self) -> None:
            for job in list(self.workers.values()):
                job_id = getattr(job, "job_id", None)
                if job_id and job_id not in self._job_ids:
                    self._job_ids.append(job_id)

        def _start_checking(self) -> None:
            if self.status in (Status.closing, Status.closed):
                return
            self._checking = PeriodicCallback(self._check, self._check_interval * 1000)
            self._checking.start()

        async def _check(self) -> None:
            if self.status != Status.running:
                return
            self._note_job_ids()
            # Only jobs submitted before squeue runs can be judged by its answer.
            before = {
                name: job.job_id
                for name, job in self.workers.items()
                if getattr(job, "job_id", None)
            }
            queued = await _squeue_ids()
            if queued is None:  # squeue failed this time: decide nothing
                return
            lost = [
                name
                for name, job_id in before.items()
                if job_id not in queued
                and getattr(self.workers.get(name), "job_id", None) == job_id
            ]
            for name in lost:
                job = self.workers.pop(name)
                job_id = job.job_id
                job.status = Status.closed
                await job.close()  # scancel; harmless for a job already gone
                del job
                self._replaced.append(job_id)
                logger.warning(
                    "SLURM job %s (%s) is no longer queued or running%s",
                    job_id,
                    name,
                    "; submitting a replacement" if self._keep_jobs else "",
                )
            if self._keep_jobs and (lost or len(self.workers) < self._keep_jobs):
                self.scale(jobs=self._keep_jobs)
            elif lost:
                await self._correct_state()

        async def _close(self):
            if self._checking is not None:
                self._checking.stop()
                self._checking = None
            self._note_job_ids()
            ours = list(self._job_ids)
            await super()._close()
            await _cancel_and_wait(ours, timeout=self._close_timeout)
            # security: true wrote the workers' certificates to temporary files, kept
            # open by dask-jobqueue as _job_<key>: closing one deletes it.
            for key in ("ca_file", "cert", "key"):
                handle = self.__dict__.pop(f"_job_{key}", None)
                if handle is not None:
                    with suppress(OSError):
                        handle.close()

    _SLURM_CLASS = KeptSLURMCluster
    return KeptSLURMCluster


_SLURM_CLASS = None


async def _run(*cmd: str, timeout: float = 30.0) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        *cmd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        return -1, f"{cmd[0]} timed out after {timeout} s"
    return proc.returncode, out.decode(errors="replace")


async def _squeue_ids() -> set[str] | None:
    """Ids of this user's jobs that SLURM still lists (pending, running, completing)."""
    code, out = await _run("squeue", "-h", "-o", "%i", "-u", getpass.getuser())
    if code != 0:
        logger.warning("squeue failed (%s): %s", code, out.strip())
        return None
    return {line.strip() for line in out.splitlines() if line.strip()}


async def _cancel_and_wait(job_ids: list[str], *, timeout: float) -> None:
    """``scancel`` the jobs still listed and wait until ``squeue`` lists none of them."""
    if not job_ids or shutil.which("squeue") is None:
        return
    deadline = time.monotonic() + timeout
    cancelled = False
    while True:
        queued = await _squeue_ids()
        left = sorted(set(job_ids) & queued) if queued is not None else job_ids
        if not left:
            return
        if not cancelled:
            await _run("scancel", *left)
            cancelled = True
        if time.monotonic() > deadline:
            logger.warning(
                "SLURM jobs %s still listed %.0f s after cancelling", left, timeout
            )
            return
        # Cancelled jobs show as CG (completing) for a few seconds.
        await asyncio.sleep(0.5)


def _shared_temp_directory(cfg: Mapping[str, Any]) -> str:
    return str(cfg.get("shared-temp-directory") or _jobqueue("shared-temp-directory") or "~")


def _make_slurm(cfg: dict, security=None):
    kwargs = slurm_job_kwargs(cfg)
    scheduler_options = dict(_jobqueue("scheduler-options") or {})
    if "dashboard-address" in cfg or "dashboard_address" not in scheduler_options:
        scheduler_options["dashboard_address"] = _dashboard_option(cfg)
    if security is None and cfg.get("security"):
        security = True
    if security is not None:
        kwargs["security"] = security
        kwargs["shared_temp_directory"] = _shared_temp_directory(cfg)
    adapt = cfg.get("adapt")
    jobs = None if adapt is not None else cfg.get("jobs")
    cls = _slurm_cluster_class()
    try:
        with dask.config.set(dask_settings(cfg)):  # the scheduler reads them as it starts
            cluster = cls(
                keep_jobs=jobs,
                check_interval=parse_timedelta(cfg.get("check-interval") or "10s"),
                close_timeout=parse_timedelta(cfg.get("close-timeout") or "60s"),
                scheduler_options=scheduler_options,
                **kwargs,
            )
    except (TypeError, ValueError) as err:
        if isinstance(err, ConfigError):
            raise
        raise ConfigError(f"cluster config cannot make a SLURM cluster: {err}") from err
    if adapt is not None:
        cluster.adapt(minimum_jobs=adapt.get("minimum", 0), maximum_jobs=adapt["maximum"])
    elif jobs:
        cluster.scale(jobs=jobs)
    return cluster


# --- public --------------------------------------------------------------------------------


def make_cluster(cluster_config: Mapping[str, Any] | None = None, *, security=None):
    """Start the cluster a config describes (kinds ``local`` and ``slurm``).

    Parameters
    ----------
    cluster_config
        The run config's ``cluster:`` mapping; ``None`` for the defaults.
    security : distributed.Security, optional
        TLS certificates for the scheduler and workers (instead of ``security: true``'s
        temporary ones).

    Returns
    -------
    distributed.LocalCluster or dask_jobqueue.SLURMCluster
        Started; the caller closes it (``with make_cluster(cfg) as cluster:``). A SLURM
        cluster has submitted its jobs (``jobs: N``) or started adapting; it does not wait
        for them to start.

    Raises
    ------
    ConfigError
        An invalid config, or kind ``address`` (there is no cluster to start: use
        :func:`make_client`).
    """
    cfg = resolve_config(cluster_config)
    if cfg["kind"] == "local":
        return _make_local(cfg, security)
    if cfg["kind"] == "slurm":
        return _make_slurm(cfg, security)
    raise ConfigError(
        f"cluster kind 'address' connects to the running scheduler at {cfg['address']!r}; "
        f"there is no cluster to start (use make_client)"
    )


@contextmanager
def make_client(
    cluster_config: Mapping[str, Any] | None = None, *, quiet: bool = False, security=None
) -> Iterator[Client]:
    """A :class:`distributed.Client` on the cluster a config describes; closes both after.

    Workers are made single-threaded (:class:`SingleThreaded`), the dashboard link is
    printed to stderr unless ``quiet``, and on exit a cluster started here is closed: for
    SLURM, every job it submitted is cancelled and gone from ``squeue``.

    Parameters
    ----------
    cluster_config
        The run config's ``cluster:`` mapping (``kind: local | address | slurm`` and that
        kind's keys); ``None`` for the defaults (a local cluster sized to the machine).
    quiet
        Do not print the dashboard link.
    security : distributed.Security, optional
        TLS certificates: those the scheduler at ``address`` expects (``kind: address``),
        or those to give a cluster started here (instead of ``security: true``).

    Examples
    --------
    >>> with make_client({"kind": "local", "n-workers": 2}) as client:  # doctest: +SKIP
    ...     client.submit(sum, [1, 2]).result()
    3
    """
    cfg = resolve_config(cluster_config)
    if cfg["kind"] == "address" and cfg.get("security"):
        raise ConfigError(
            "cluster kind 'address' joins a scheduler started elsewhere, so 'security: true' "
            "cannot make its certificates: pass them as a distributed.Security "
            "(make_client(..., security=...), compute_distances(..., security=...)) or set "
            "Dask's distributed.comm.tls config"
        )
    here = cfg["kind"] == "local" and cfg.get("worker-processes") is False
    with _single_threaded_here() if here else contextlib.nullcontext():
        yield from _client(cfg, quiet=quiet, security=security, here=here)


def _client(cfg: dict, *, quiet: bool, security, here: bool) -> Iterator[Client]:
    """:func:`make_client`'s body; ``here``: the cluster's worker is in this process (its
    prepared reps are let go when it closes)."""
    cluster = None if cfg["kind"] == "address" else make_cluster(cfg, security=security)
    if cluster is not None:
        security = cluster.security
    interrupted = False
    try:
        client = Client(cluster if cluster is not None else cfg["address"], security=security)
        try:
            client.register_plugin(SingleThreaded(), name=SingleThreaded.name)
            if not quiet:
                where = {
                    "local": ("local cluster in this process, " if here else "local cluster, ")
                    + _local_size(client),
                    "address": f"scheduler {cfg.get('address')}",
                    "slurm": "SLURM cluster, " + _slurm_size(cfg),
                }[cfg["kind"]]
                print(
                    f"smd-dist: {where}; dashboard {dashboard_link(client, cfg)}",
                    file=sys.stderr,
                    flush=True,
                )
            yield client
        except KeyboardInterrupt:
            interrupted = True
            with contextlib.suppress(Exception):  # the workers' own logs, in their processes
                client.run(_mute_logs, on_error="ignore")
            raise
        finally:
            with _silenced() if interrupted else contextlib.nullcontext():
                client.close()
    finally:
        if cluster is not None:
            with _silenced() if interrupted else _nanny_quiet():
                cluster.close()
        if here:
            from smd_dist.engine import worker_cache

            worker_cache.clear()


@contextmanager
def _nanny_quiet() -> Iterator[None]:
    """No "Worker process still alive after 4.0 seconds, killing" when our cluster closes:
    on a busy machine a worker takes that long to exit, and killing it is what closing
    asks for."""
    nanny = logging.getLogger("distributed.nanny")
    level = nanny.level
    nanny.setLevel(logging.ERROR)
    try:
        yield
    finally:
        nanny.setLevel(level)


async def _mute_logs() -> None:
    # A coroutine runs on the worker's event loop, not behind the task it is busy with.
    logging.disable(logging.CRITICAL)


@contextmanager
def _silenced() -> Iterator[None]:
    """Dask's and asyncio's logs off while a cluster stops after Ctrl-C.

    Workers stopped in the middle of a task make Dask log each closed connection, the
    nanny's kill of a busy worker, and asyncio futures that nobody awaits any more: a page
    of tracebacks about the shutdown that was asked for.
    """
    previous = logging.root.manager.disable
    logging.disable(logging.CRITICAL)
    try:
        yield
    finally:
        logging.disable(previous)


def _local_size(client) -> str:
    """``"2 workers"``, or ``"1 worker x 2 threads"`` when workers run several task threads."""
    threads = [w["nthreads"] for w in client.scheduler_info()["workers"].values()]
    size = f"{len(threads)} worker" + ("s" if len(threads) != 1 else "")
    if any(n != 1 for n in threads):
        each = max(threads, default=1)
        size += f" x {each} thread" + ("s" if each != 1 else "")
    return size


def _slurm_size(cfg: dict) -> str:
    adapt = cfg.get("adapt")
    if adapt is not None:
        return f"adapting between {adapt.get('minimum', 0)} and {adapt['maximum']} jobs"
    return f"{cfg.get('jobs')} jobs"
