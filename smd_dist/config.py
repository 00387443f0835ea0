"""Configuration: package defaults, user YAML, environment, then keyword arguments.

Follows dask-jobqueue: the defaults live in ``smd_dist.yaml`` inside the package and are
merged into :mod:`dask.config` under the key ``smd-dist``. A user overrides them in
``~/.config/dask/*.yaml`` or with environment variables ``DASK_SMD_DIST__...``
(e.g. ``DASK_SMD_DIST__DEVICE=cpu``). Run configs (``configs/*.yaml``) are validated here.
"""

from __future__ import annotations

import difflib
import os
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
    "metrics": (str, list, type(None)),
    "preprocessing": (dict, type(None)),
    "device": (str, type(None)),
    "cluster": (dict, type(None)),
    "resume": (bool,),
    "engine": (dict, type(None)),
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
    return cfg


def load_run_config(path: str | os.PathLike) -> dict:
    """Load and validate a run config YAML file.

    Relative ``store`` and ``output`` paths are taken relative to the config file's folder.

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
        value = str(cfg[key])
        if "://" not in value and not os.path.isabs(value):
            cfg[key] = str((base / value).resolve())
    return cfg
