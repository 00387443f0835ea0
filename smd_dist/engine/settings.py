"""The engine's settings (flushing, waves, how pairs are batched into tasks) and a run's
options (preprocessing, device), each checked before anything runs."""

from __future__ import annotations

from smd_dist import config

__all__ = [
    "DEVICE_TYPES",
    "ENGINE_KEYS",
    "NORMALIZE",
    "PREPROCESSING_KEYS",
    "device_option",
    "engine_settings",
    "flag",
    "preprocessing",
]

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


#: Values ``normalize`` takes (see :func:`smd_dist.kernel.preparation.preprocess`).
NORMALIZE = (None, "unit", "zscore")
#: Values ``constant_neurons`` takes (see :func:`smd_dist.kernel.preparation.preprocess`).
CONSTANT_NEURONS = ("refuse", "drop")
#: Keys of a run config's ``preprocessing:`` section.
PREPROCESSING_KEYS = {
    "center": "subtract each neuron's mean over stimuli (true | false; default true)",
    "normalize": "null | unit | zscore (default null)",
    "constant_neurons": "refuse | drop: neurons constant over the stimuli (default refuse)",
}
#: Device types the kernels run on (``cuda`` falls back to ``cpu`` without CUDA).
DEVICE_TYPES = ("cpu", "cuda")


def preprocessing(center=None, normalize="default", constant_neurons=None) -> dict:
    """``{"center": bool, "normalize": ...}``: the arguments over the ``smd-dist.preprocessing``
    config, checked. ``"constant_neurons": "drop"`` is added only when set, so that outputs
    made before the option existed keep their preprocessing (and stay resumable).

    Raises
    ------
    smd_dist.config.ConfigError
        ``center`` is not a bool, ``normalize`` is not one of :data:`NORMALIZE`, or
        ``constant_neurons`` is not one of :data:`CONSTANT_NEURONS`.
    """
    if center is None:
        center = config.get("preprocessing.center", True)
    if normalize == "default":
        normalize = config.get("preprocessing.normalize", None)
    if not isinstance(center, bool):
        raise config.ConfigError(f"preprocessing 'center' must be true or false, got {center!r}")
    if normalize not in NORMALIZE:
        raise config.ConfigError(
            f"preprocessing 'normalize' must be null, 'unit' or 'zscore', got {normalize!r}"
            f"{config.suggest(normalize, ['unit', 'zscore'])}"
        )
    if constant_neurons is None:
        constant_neurons = config.get("preprocessing.constant_neurons", "refuse")
    if constant_neurons not in CONSTANT_NEURONS:
        raise config.ConfigError(
            f"preprocessing 'constant_neurons' must be 'refuse' or 'drop', got "
            f"{constant_neurons!r}{config.suggest(constant_neurons, CONSTANT_NEURONS)}"
        )
    prep = {"center": center, "normalize": normalize}
    if constant_neurons == "drop":
        prep["constant_neurons"] = "drop"
    return prep


def device_option(device=None) -> str | None:
    """The kernels' device: the argument over the ``smd-dist.device`` config, checked.

    ``None`` (CUDA where present), ``"cpu"``, ``"cuda"`` or ``"cuda:<index>"``; the run
    records it as a string.

    Raises
    ------
    smd_dist.config.ConfigError
        Any other value.
    """
    if device is None:
        device = config.get("device", None)
    if device is None:
        return None
    text = str(device)
    kind, _, index = text.partition(":")
    if kind not in DEVICE_TYPES or (index and not (kind == "cuda" and index.isdigit())):
        raise config.ConfigError(
            f"device must be null, 'cpu', 'cuda' or 'cuda:<index>', got {device!r}"
            f"{config.suggest(text, DEVICE_TYPES)}"
        )
    return text


def flag(name: str, value) -> bool:
    """``value`` if it is a bool; else a :class:`~smd_dist.config.ConfigError` naming ``name``."""
    if not isinstance(value, bool):
        raise config.ConfigError(f"{name!r} must be true or false, got {value!r}")
    return value
