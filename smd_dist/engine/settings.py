"""The engine's settings: flushing, waves and how pairs are batched into tasks."""

from __future__ import annotations

from smd_dist import config

__all__ = ["ENGINE_KEYS", "engine_settings"]

ENGINE_KEYS = {
    "flush-seconds": "results reach the output at least this often (seconds)",
    "wave-size": "tasks in flight at once (null: 4 per worker thread)",
    "max-pairs-per-task": "most pairs batched into one task",
    "task-entries": "pairs are batched into tasks of about this many cost entries (Nx*Ny)",
}


def engine_settings(overrides: dict | None = None) -> dict:
    """The engine settings: ``overrides`` over the ``smd-dist.engine`` config, checked.

    Keys may be spelt with ``-`` or ``_`` (environment variables such as
    ``DASK_SMD_DIST__ENGINE__FLUSH_SECONDS`` arrive with ``_``).

    Raises
    ------
    smd_dist.config.ConfigError
        An unknown key (with the closest valid one) or a value out of range.
    """
    merged = {}
    layers = (config.package_default("engine"), config.get("engine", {}) or {}, overrides or {})
    for layer in layers:
        if not isinstance(layer, dict):
            raise config.ConfigError(f"engine settings must be a mapping, got {layer!r}")
        merged.update(config.normalize_keys(layer, where="engine settings"))
    config.check_keys(merged, ENGINE_KEYS, where="engine settings")
    out = {key: merged[key] for key in ENGINE_KEYS}
    seconds = out["flush-seconds"]
    if isinstance(seconds, bool) or not isinstance(seconds, int | float) or not seconds > 0:
        raise config.ConfigError(
            f"engine setting 'flush-seconds' must be a number > 0, got {seconds!r}"
        )
    out["flush-seconds"] = float(seconds)
    for key, low in (("wave-size", 1), ("max-pairs-per-task", 1), ("task-entries", 0)):
        value = out[key]
        if key == "wave-size" and value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise config.ConfigError(
                f"engine setting {key!r} must be an integer >= {low}, got {value!r}"
            )
    return out
