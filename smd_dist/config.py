"""Configuration: package defaults, user YAML, environment, then keyword arguments.

Follows dask-jobqueue: the defaults live in ``smd_dist.yaml`` inside the package and are
merged into :mod:`dask.config` under the key ``smd-dist``. A user overrides them in
``~/.config/dask/*.yaml`` or with environment variables ``DASK_SMD_DIST__...``
(e.g. ``DASK_SMD_DIST__DEVICE=cpu``). Run configs (``configs/*.yaml``) are validated here.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import dask.config
import yaml

DEFAULTS_PATH = Path(__file__).with_name("smd_dist.yaml")

with open(DEFAULTS_PATH) as _f:
    _DEFAULTS = yaml.safe_load(_f)

dask.config.update_defaults(_DEFAULTS)


class ConfigError(ValueError):
    """A run config or setting that cannot be used, with the offending key and value."""


RUN_CONFIG_KEYS = {
    "store": "path (or URL) of the activation store",
    "reps": "optional list of glob patterns on 'model/layer'",
    "against": "optional second selection, the matrix's columns: a list of patterns in the "
               "store, or {store: PATH, reps: [...]} for another store with the same stimuli",
    "metrics": "list of metric names",
    "preprocessing": "{center: bool, normalize: null|unit|zscore, constant_neurons: refuse|drop}",
    "device": "null | cpu | cuda",
    "output": "path of the output zarr",
    "cluster": "{kind: local|address|slurm, ...}",
    "resume": "bool, skip pairs already in the output (default true)",
    "engine": "engine tuning: flush-seconds, wave-size, max-pairs-per-task, task-entries",
}
# What each top-level value must be; the values inside the sections are checked by the
# engine (smd_dist.engine.settings, smd_dist.engine.clusters) before anything runs.
_RUN_CONFIG_TYPES = {
    "store": (str,),
    "output": (str,),
    "reps": (str, list, type(None)),
    "against": (str, list, dict, type(None)),
    "metrics": (str, list, type(None)),
    "preprocessing": (dict, type(None)),
    "device": (str, type(None)),
    "cluster": (dict, type(None)),
    "resume": (bool,),
    "engine": (dict, type(None)),
}
#: The keys of a run config's ``against:`` mapping (and of ``compute_distances(against=)``).
AGAINST_KEYS = {
    "store": "path (or URL) of the store holding the second selection (default: the run's)",
    "reps": "patterns on 'model/layer' in that store (default: all its reps)",
}
_TYPE_NAMES = {str: "a string", list: "a list", dict: "a mapping", bool: "true or false",
               type(None): "null"}


def get(key: str, default: Any = None) -> Any:
    """Read ``smd-dist.<key>`` from :mod:`dask.config`."""
    return dask.config.get(f"smd-dist.{key}", default=default)


def package_default(key: str) -> Any:
    """``smd-dist.<key>`` as the package ships it (``smd_dist.yaml``), whatever is set since."""
    value = _DEFAULTS["smd-dist"]
    for part in key.split("."):
        value = value[part]
    return value


def normalize_keys(mapping: Mapping, *, where: str) -> dict:
    """``mapping`` with its keys spelt with ``-`` (environment variables arrive with ``_``).

    Raises
    ------
    ConfigError
        When two keys differ only in that spelling.
    """
    out = {}
    for key, value in mapping.items():
        norm = str(key).replace("_", "-")
        if norm in out:
            raise ConfigError(f"{where} gives {norm!r} twice (as {key!r} too)")
        out[norm] = value
    return out


def suggest(name: str, valid: list[str] | tuple[str, ...]) -> str:
    """Return ``" (did you mean 'x'?)"`` for the closest valid name, or an empty string."""
    close = difflib.get_close_matches(str(name), [str(v) for v in valid], n=2, cutoff=0.5)
    if not close:
        return ""
    return " (did you mean " + " or ".join(repr(c) for c in close) + "?)"


def check_keys(mapping: dict, valid: dict | list | tuple, *, where: str) -> None:
    """Refuse unknown keys in ``mapping``, naming each and the closest valid one."""
    for key in mapping:
        if key not in valid:
            raise ConfigError(
                f"unknown key {key!r} in {where}{suggest(key, list(valid))}; "
                f"valid keys: {', '.join(sorted(valid))}"
            )


def read_config_file(path: str | os.PathLike) -> dict:
    """Parse a run config YAML file and check its top-level keys; nothing is required.

    Raises
    ------
    ConfigError
        The file is missing, is not valid YAML, is not a mapping, or has unknown keys.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"run config {str(path)!r} does not exist")
    try:
        with open(path) as f:
            cfg = yaml.safe_load(f)
    except yaml.YAMLError as err:
        raise ConfigError(f"run config {str(path)!r} is not valid YAML: {err}") from err
    if not isinstance(cfg, dict):
        raise ConfigError(
            f"run config {str(path)!r} must be a mapping of keys to values, "
            f"got {type(cfg).__name__}"
        )
    where = f"run config {str(path)!r}"
    check_keys(cfg, RUN_CONFIG_KEYS, where=where)
    for key, value in cfg.items():
        types = _RUN_CONFIG_TYPES[key]
        if not isinstance(value, types):
            wanted = " or ".join(_TYPE_NAMES[t] for t in types)
            raise ConfigError(f"{where}: {key!r} must be {wanted}, got {value!r}")
        if isinstance(value, list) and not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{where}: {key!r} must be a list of strings, got {value!r}")
    check_keys(cfg.get("preprocessing") or {}, ("center", "normalize", "constant_neurons"),
               where=f"{where}, preprocessing")
    against = cfg.get("against")
    if isinstance(against, dict):
        check_keys(against, AGAINST_KEYS, where=f"{where}, against")
        if not isinstance(against.get("store"), str | type(None)):
            raise ConfigError(
                f"{where}: against.store must be a store path or URL, got {against['store']!r}"
            )
        reps = against.get("reps")
        if not (reps is None or isinstance(reps, str) or (
            isinstance(reps, list) and all(isinstance(r, str) for r in reps)
        )):
            raise ConfigError(
                f"{where}: against.reps must be a pattern or a list of patterns, got {reps!r}"
            )
    return cfg


def load_run_config(path: str | os.PathLike) -> dict:
    """Load and validate a run config YAML file.

    Relative ``store``, ``output`` and ``against.store`` paths are taken relative to the
    config file's folder.

    Raises
    ------
    ConfigError
        As :func:`read_config_file`, or the file lacks ``store`` or ``output``.
    """
    cfg = read_config_file(path)
    for required in ("store", "output"):
        if not cfg.get(required):
            raise ConfigError(f"run config {str(path)!r} lacks the required key {required!r}")
    base = Path(path).resolve().parent
    for key in ("store", "output"):
        cfg[key] = _relative_to(base, cfg[key])
    against = cfg.get("against")
    if isinstance(against, dict) and against.get("store"):
        cfg["against"] = {**against, "store": _relative_to(base, against["store"])}
    return cfg


def _relative_to(base: Path, value) -> str:
    value = str(value)
    if "://" not in value and not os.path.isabs(value):
        return str((base / value).resolve())
    return value


# --- secrets --------------------------------------------------------------------------------

#: Words that mark a config key, an environment variable or an option as holding a secret.
SECRET_WORDS = frozenset({
    "token", "password", "passwd", "pwd", "secret", "key", "apikey", "credential",
    "credentials", "auth", "authorization", "cookie", "session", "private",
})
REDACTED = "***"
_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<user>[^/@:\s]*):[^/@\s]*@")
_ASSIGNMENT = re.compile(r"(?P<name>\b[A-Za-z_][A-Za-z0-9_]*)=(?P<value>'[^']*'|\"[^\"]*\"|\S+)")
_LONE_OPTION = re.compile(r"--?[A-Za-z][A-Za-z0-9_-]*")
_OPTION = re.compile(r"(?P<name>--?[A-Za-z][A-Za-z0-9_-]*)(?P<sep>[= ]+)(?P<value>\S+)")


def is_secret_name(name: str) -> bool:
    """Whether a key, variable or option name says it holds a secret.

    >>> [is_secret_name(n) for n in ("HF_TOKEN", "aws-secret-access-key", "keep", "address")]
    [True, True, False, False]
    """
    words = [w for w in re.split(r"[^A-Za-z0-9]+|(?<=[a-z])(?=[A-Z])", name) if w]
    return any(w.lower() in SECRET_WORDS or w.lower().endswith(("token", "secret", "password"))
               for w in words)


def redact(value: Any) -> Any:
    """A copy of a config with its secrets replaced by ``***``, to record it safely.

    Replaced: the value of every key whose name says it holds a secret
    (:func:`is_secret_name`: ``token``, ``password``, ``secret``, ``key``, ...), the
    password in ``scheme://user:password@host`` addresses, and in strings (a job-script
    prologue line, worker options) the value of ``NAME=value`` and ``--name value`` where
    the name says secret, e.g. ``export HF_TOKEN=hf_...``.
    """
    if isinstance(value, Mapping):
        return {
            k: (REDACTED if is_secret_name(str(k)) and v not in (None, "") else redact(v))
            for k, v in value.items()
        }
    if isinstance(value, list | tuple):
        out, hide_next = [], False
        for item in value:
            # ["--token", "abc"]: an option and its value as two items.
            out.append(REDACTED if hide_next and isinstance(item, str) else redact(item))
            hide_next = (isinstance(item, str) and _LONE_OPTION.fullmatch(item) is not None
                         and is_secret_name(item))
        return type(value)(out)
    if isinstance(value, str):
        return _redact_text(value)
    return value


def _redact_text(text: str) -> str:
    text = _USERINFO.sub(lambda m: f"{m['scheme']}{m['user']}:{REDACTED}@", text)
    text = _ASSIGNMENT.sub(
        lambda m: f"{m['name']}={REDACTED}" if is_secret_name(m["name"]) else m[0], text
    )
    return _OPTION.sub(
        lambda m: f"{m['name']}{m['sep']}{REDACTED}"
        if is_secret_name(m["name"]) and not m["value"].startswith("-") else m[0],
        text,
    )
