"""Activations of named torch modules, streamed batch by batch into an activation store.

Forward hooks on the requested modules pool each output to a (batch, neurons) matrix on
the fly, so only one batch of one layer is ever held in memory. Arrays are
(stimuli, neurons): a neuron's tuning curve is a column.
"""

from __future__ import annotations

import contextlib
import difflib
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from smd_dist.store.activation_store import ActivationStore, RepRecord, StoreError, rep_id

POOLINGS = ("flatten", "mean")
# Output keys tried, in order, when a module returns a dict or a transformers ModelOutput.
OUTPUT_KEYS = ("last_hidden_state", "hidden_states", "logits", "pooler_output")


class ExtractionError(ValueError):
    """A model, layer, batch or pooling that extraction cannot handle."""


def first_tensor(output: Any, *, where: str = "module") -> torch.Tensor:
    """The tensor that stands for a module's output.

    A tensor is itself; a tuple or list gives its first tensor element (transformers
    layers return ``(hidden_states, attentions, ...)``); a dict or ``ModelOutput`` gives
    the first of :data:`OUTPUT_KEYS` present, else its first tensor value.
    """
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping):
        for key in OUTPUT_KEYS:
            if isinstance(output.get(key), torch.Tensor):
                return output[key]
        values = list(output.values())
    elif isinstance(output, tuple | list):
        values = list(output)
    else:
        raise ExtractionError(f"{where} returned {type(output).__name__}, not a tensor")
    for value in values:
        if isinstance(value, torch.Tensor):
            return value
    raise ExtractionError(f"{where} returned a {type(output).__name__} without any tensor")


def pool(
    output: torch.Tensor,
    pooling: str,
    *,
    token_mask: torch.Tensor | None = None,
    where: str = "module",
) -> torch.Tensor:
    """Reduce a module output of shape (B, ...) to a (B, neurons) matrix.

    ``"flatten"`` keeps every unit: (B, C, H, W) becomes (B, C·H·W). ``"mean"`` averages
    over positions: over H, W (all axes after the channel axis) for outputs with 4 or
    more axes (channels-first conv maps), over tokens T for (B, T, D) outputs
    (transformers), optionally weighted by a (B, T) ``token_mask`` so padding is ignored:

    .. math::

        \\bar h_{b} = \\frac{\\sum_t m_{bt} h_{bt}}{\\sum_t m_{bt}}

    (B,) and (B, D) outputs are returned as (B, 1) and (B, D) under either pooling.
    A 3-D output of a 1-D convolution, (B, C, L), would be averaged over C by "mean":
    pass ``pooling=callable`` for that case.
    """
    if output.ndim == 0:
        raise ExtractionError(f"{where} returned a scalar, not a batch of activations")
    if output.ndim == 1:
        return output[:, None]
    if output.ndim == 2:
        return output
    if pooling == "flatten":
        return output.reshape(output.shape[0], -1)
    if output.ndim == 3:
        if token_mask is None:
            return output.mean(dim=1)
        mask = token_mask.to(device=output.device, dtype=output.dtype)
        if mask.shape != output.shape[:2]:
            raise ExtractionError(
                f"{where}: token mask of shape {tuple(mask.shape)} does not match the "
                f"output's (batch, tokens) {tuple(output.shape[:2])}"
            )
        counts = mask.sum(dim=1, keepdim=True)
        if (counts <= 0).any():
            rows = torch.nonzero(counts[:, 0] <= 0).flatten().tolist()
            raise ExtractionError(f"{where}: token mask selects no tokens in batch rows {rows}")
        return (output * mask[..., None]).sum(dim=1) / counts
    return output.mean(dim=tuple(range(2, output.ndim)))


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, np.ndarray):
        batch = torch.from_numpy(batch)
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, tuple | list):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


def _batch_size(batch: Any) -> int | None:
    if isinstance(batch, torch.Tensor | np.ndarray):
        return int(batch.shape[0])
    values = batch.values() if isinstance(batch, Mapping) else batch
    if isinstance(values, Iterable) and not isinstance(values, str | bytes):
        for v in values:
            n = _batch_size(v)
            if n is not None:
                return n
    return None


def _resolve_layers(model: torch.nn.Module, layers: Any) -> dict[str, str]:
    """Map module path -> stored layer name, refusing names the model does not have."""
    if isinstance(layers, str):
        layers = [layers]
    mapping = dict(layers) if isinstance(layers, Mapping) else {name: name for name in layers}
    if not mapping:
        raise ExtractionError("layers is empty: name at least one module")
    modules = dict(model.named_modules())
    names = [n for n in modules if n]
    for name in mapping:
        if name not in modules:
            close = difflib.get_close_matches(str(name), names, n=3, cutoff=0.4)
            hint = f" (did you mean {', '.join(map(repr, close))}?)" if close else ""
            shown = ", ".join(names[:60]) + (f", ... ({len(names) - 60} more)" if len(names) > 60
                                               else "")
            raise ExtractionError(
                f"the model has no module named {name!r}{hint}; its modules are: {shown}"
            )
    stored = list(mapping.values())
    if len(set(stored)) != len(stored):
        raise ExtractionError(f"two modules map to the same layer name: {stored}")
    return mapping


def extract(
    model: torch.nn.Module,
    batches: Iterable[Any],
    *,
    layers: Sequence[str] | Mapping[str, str],
    store: ActivationStore | str,
    model_name: str,
    pooling: str | Callable[[torch.Tensor, Any], torch.Tensor] = "flatten",
    device: str | torch.device | None = None,
    stimulus_ids: Sequence[Any] | None = None,
    token_mask: Callable[[Any], torch.Tensor] | None = None,
    forward: Callable[[torch.nn.Module, Any], Any] | None = None,
    overwrite: bool = False,
    attrs: dict | None = None,
    progress: bool = True,
) -> list[RepRecord]:
    """Run ``model`` over ``batches`` and store the activations of the named modules.

    Each requested module's output on a batch is pooled to (batch, neurons) and appended
    to its rep ``(model_name, layer)``; the reps become visible in the store only when
    every batch went through. The model runs in eval mode under :func:`torch.no_grad`;
    its training flag is restored afterwards.

    Parameters
    ----------
    model : torch.nn.Module
    batches : iterable
        Stimulus batches in stimulus order. A tensor or array is passed as
        ``model(batch)``; a tuple or list as ``model(*batch)``; a dict (e.g. a tokenizer's
        output) as ``model(**batch)``.
    layers : sequence of str or mapping
        Module paths as in ``model.named_modules()`` (``"features.6"``,
        ``"encoder.layer.3"``), or a mapping ``{module path: stored layer name}``.
    store : ActivationStore or str
        Target store (a path opens it in mode ``"a"``).
    model_name : str
        Model name in the store.
    pooling : {"flatten", "mean"} or callable
        How an output becomes (batch, neurons); see :func:`pool`. A callable gets
        ``(output_tensor, batch)`` and returns a (batch, neurons) tensor.
    device : str or torch.device, optional
        Move the model (in place) and batches there (a CUDA request without CUDA falls
        back to the CPU with a warning); None leaves the model where it is.
    stimulus_ids : sequence, optional
        Ids of the stimuli, one per row; recorded in the store (which refuses a
        different set).
    token_mask : callable, optional
        ``token_mask(batch) -> (B, T)`` tensor for the "mean" pooling of (B, T, D)
        outputs. By default, a dict batch with an ``"attention_mask"`` supplies it, so
        padding tokens are left out of the mean.
    forward : callable, optional
        ``forward(model, batch)`` runs the model on one batch, for batches the default
        rule above does not fit: a DataLoader of ``(images, labels)`` needs
        ``forward=lambda m, b: m(b[0])``.
    overwrite : bool
        Replace reps that already exist.
    attrs : dict, optional
        Extra JSON-safe attrs stored on every rep.
    progress : bool
        Show a tqdm progress bar.

    Returns
    -------
    list of RepRecord
        One per layer, in the order given; the store lists them in forward order.

    Raises
    ------
    ExtractionError
        Unknown module name (the message lists those that exist), unknown pooling, an
        output without a tensor, a module not called (or called twice) in a forward pass.
    StoreError
        Non-finite activations (naming model, layer and stimulus rows), a neuron count
        that changes between batches, a stimulus count that differs from the store's, an
        existing rep without ``overwrite``.
    """
    if not isinstance(model, torch.nn.Module):
        raise ExtractionError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not callable(pooling) and pooling not in POOLINGS:
        raise ExtractionError(f"pooling must be one of {POOLINGS} or a callable, got {pooling!r}")
    if not isinstance(store, ActivationStore):
        store = ActivationStore(store, mode="a")
    mapping = _resolve_layers(model, layers)
    if not overwrite:
        existing = [
            rep_id(model_name, lay) for lay in mapping.values() if (model_name, lay) in store
        ]
        if existing:
            raise StoreError(
                f"{', '.join(existing)} already in {store.path!r}; "
                "pass overwrite=True (--overwrite) to replace"
            )
    if stimulus_ids is not None:
        store.set_stimuli(stimulus_ids)
    if device is not None:
        from smd_dist.kernel.preparation import resolve_device

        device = resolve_device(device)  # "cuda" without CUDA: cpu, with a warning
        model.to(device)
    else:
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")

    pooling_name = (
        pooling if isinstance(pooling, str) else getattr(pooling, "__name__", "callable")
    )
    captured: dict[str, torch.Tensor] = {}
    state: dict[str, Any] = {"batch": None, "mask": None}

    def make_hook(module_name: str):
        where = f"{model_name}/{mapping[module_name]} (module {module_name!r})"

        def hook(_module, _inputs, output):
            if module_name in captured:
                raise ExtractionError(
                    f"{where} was called twice in one forward pass; its activations are "
                    "ambiguous (hook a module that runs once)"
                )
            tensor = first_tensor(output, where=where)
            if callable(pooling):
                pooled = pooling(tensor, state["batch"])
            else:
                pooled = pool(tensor, pooling, token_mask=state["mask"], where=where)
            captured[module_name] = pooled.detach().to("cpu", torch.float32)

        return hook

    modules = dict(model.named_modules())
    was_training = model.training
    total = len(batches) if hasattr(batches, "__len__") else None
    with contextlib.ExitStack() as stack:
        for module_name in mapping:
            handle = modules[module_name].register_forward_hook(make_hook(module_name))
            stack.callback(handle.remove)
        stack.callback(model.train, was_training)
        model.eval()
        writers: dict[str, Any] = {}
        row = 0
        iterator = batches
        if progress:
            from tqdm.auto import tqdm

            iterator = tqdm(batches, total=total, desc=f"extract {model_name}", unit="batch")
        with torch.no_grad():
            for batch in iterator:
                batch = _to_device(batch, device)
                state["batch"] = batch
                if token_mask is not None:
                    state["mask"] = token_mask(batch)
                elif isinstance(batch, Mapping) and "attention_mask" in batch:
                    state["mask"] = batch["attention_mask"]
                captured.clear()
                if forward is not None:
                    forward(model, batch)
                elif isinstance(batch, Mapping):
                    model(**batch)
                elif isinstance(batch, tuple | list):
                    model(*batch)
                else:
                    model(batch)
                n = _batch_size(batch)
                for module_name, layer in mapping.items():
                    if module_name not in captured:
                        raise ExtractionError(
                            f"module {module_name!r} ({model_name}/{layer}) was not called in "
                            f"the forward pass of the batch starting at stimulus {row}"
                        )
                # Hooks fire in forward order: the reps are created (and listed) in depth
                # order, whatever order the layers were named in.
                for module_name in captured:
                    layer = mapping[module_name]
                    acts = captured[module_name]
                    if acts.ndim != 2 or (n is not None and acts.shape[0] != n):
                        raise ExtractionError(
                            f"{model_name}/{layer}: pooled output has shape "
                            f"{tuple(acts.shape)}, expected ({n}, neurons)"
                        )
                    if module_name not in writers:
                        writers[module_name] = stack.enter_context(
                            store.writer(
                                model_name,
                                layer,
                                int(acts.shape[1]),
                                overwrite=overwrite,
                                attrs={
                                    **(attrs or {}),
                                    "source": "smd_dist.extract",
                                    "module": module_name,
                                    "pooling": pooling_name,
                                    "model_class": type(model).__qualname__,
                                },
                            )
                        )
                    writers[module_name].append(acts.numpy())
                row += int(next(iter(captured.values())).shape[0])
        if not writers:
            raise ExtractionError(f"{model_name}: batches was empty; nothing to extract")
    return [writers[module_name].record for module_name in mapping]
