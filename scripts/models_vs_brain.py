#!/usr/bin/env python
"""Models × "brain" on the offline demo: in-sample against cross-validated soft matching.

One trained digits CNN is held out and treated as the brain: from two of its layers
("areas") a few responsive units are "recorded" with independent trial noise. Every layer
of every other net (trained and untrained, both widths) is a model, scored against each
area with the in-sample soft matching score and the cross-validated one
(``smd_dist.soft_matching_cv``), on nested random subsets of the stimuli; a control pairs
each model with the area's responses to shuffled stimuli, where the true score is zero.
Writes ``docs/models-vs-brain.md``. Everything is seeded.

    python scripts/models_vs_brain.py                       # ~1.5 min on 2 cores
    python scripts/models_vs_brain.py --stimuli 50 500      # fewer subsets

``scripts/reproduce_paper.py`` runs it too, after the paper's claims.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import time
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr

import smd_dist
from smd_dist.store import ActivationStore

ROOT = Path(__file__).resolve().parent.parent
BRAIN = "cnn-w16-s2"
AREAS = ("conv2", "fc1")
LAYERS = ("conv1", "conv2", "fc1", "logits")


@dataclass(frozen=True)
class Setup:
    """What the comparison is run with (all of it goes into the report)."""

    brain: str = BRAIN
    areas: tuple[str, ...] = AREAS
    n_units: int = 40
    noise: float = 1.0
    stimuli: tuple[int, ...] = (50, 100, 200, 500)
    cv: int = 5
    seed: int = 0


@dataclass(frozen=True)
class Row:
    """One model layer against one area on one stimulus subset."""

    n_stimuli: int
    area: str
    model: str
    layer: str
    trained: bool
    shuffled: bool
    n_neurons: int
    in_sample: float
    cv: float
    cv_sd: float

    @property
    def gap(self) -> float:
        return self.in_sample - self.cv


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(ROOT / "demo-data"), help="demo stores folder")
    parser.add_argument("--docs", default=str(ROOT / "docs"))
    parser.add_argument("--stimuli", type=int, nargs="+", default=list(Setup.stimuli))
    parser.add_argument("--brain", default=BRAIN, help="the held-out net treated as the brain")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    data = Path(args.data)
    if not (data / "digits").exists():
        subprocess.run(["smd-dist", "demo", "build", str(data)], check=True)
    setup = Setup(brain=args.brain, stimuli=tuple(sorted(args.stimuli)), seed=args.seed)
    out = run(ActivationStore(str(data / "digits"), mode="r"), Path(args.docs), setup)
    print(f"wrote {out}")
    return 0


def run(store: ActivationStore, docs: Path, setup: Setup = Setup()) -> Path:
    """Compute the comparison on the digits store and write ``docs/models-vs-brain.md``."""
    started = time.perf_counter()
    rows = compare(store, setup)
    text = report(rows, store, setup, time.perf_counter() - started)
    docs.mkdir(parents=True, exist_ok=True)
    path = docs / "models-vs-brain.md"
    path.write_text(text)
    return path


# --- data --------------------------------------------------------------------------------


def varying(A: np.ndarray) -> np.ndarray:
    """Columns of a (stimuli, neurons) array that are not constant."""
    Z = A - A.mean(axis=0)
    return np.sqrt((Z * Z).sum(axis=0)) > 64 * np.finfo(float).eps * np.sqrt(len(A)) * np.abs(
        A
    ).max(axis=0)


def recordings(store, setup: Setup, rng) -> dict[str, np.ndarray]:
    """Per area: ``n_units`` responsive units of the brain net plus Gaussian trial noise
    with each unit's own standard deviation times ``noise``."""
    areas = {}
    for area in setup.areas:
        A = store.read(setup.brain, area).astype(np.float64)
        units = np.sort(rng.choice(np.flatnonzero(varying(A)), setup.n_units, replace=False))
        R = A[:, units]
        areas[area] = R + setup.noise * R.std(axis=0) * rng.standard_normal(R.shape)
    return areas


def compare(store, setup: Setup) -> list[Row]:
    rng = np.random.default_rng(setup.seed)
    areas = recordings(store, setup, rng)
    models = sorted({r.model for r in store.list()} - {setup.brain})
    trained = {r.model: bool(r.attrs["trained"]) for r in store.list()}
    # Nested subsets: each smaller stimulus set is part of every larger one.
    order = rng.permutation(store.n_stimuli)
    rows = []
    for n in setup.stimuli:
        stim = np.sort(order[:n])
        shuffle = rng.permutation(n)
        for area, R in areas.items():
            for model in models:
                for layer in LAYERS:
                    X = store.read(model, layer).astype(np.float64)[stim]
                    for shuffled in (False, True):
                        Y = R[stim][shuffle] if shuffled else R[stim]
                        rows.append(_row(X, Y, setup, n, area, model, layer,
                                         trained[model], shuffled))
    return rows


def _row(X, Y, setup, n, area, model, layer, trained, shuffled) -> Row:
    cv = smd_dist.soft_matching_cv(
        X, Y, cv=setup.cv, seed=setup.seed, constant_neurons="drop",
        names=(f"{model}/{layer}", f"{setup.brain}/{area}"),
    )
    # In-sample on the very neurons the folds compared.
    X = np.delete(X, cv.dropped[0], axis=1)
    Y = np.delete(Y, cv.dropped[1], axis=1)
    return Row(
        n_stimuli=n, area=area, model=model, layer=layer, trained=trained, shuffled=shuffled,
        n_neurons=X.shape[1], in_sample=smd_dist.soft_matching_score(X, Y), cv=cv.score,
        cv_sd=float(np.std(cv.fold_scores)),
    )


# --- report ------------------------------------------------------------------------------


def _mean(rows, field) -> float:
    return float(np.mean([getattr(r, field) for r in rows]))


def _group(rows, **match) -> list[Row]:
    return [r for r in rows if all(getattr(r, k) == v for k, v in match.items())]


def report(rows: list[Row], store, setup: Setup, seconds: float) -> str:
    lines = [
        "# Models × brain: in-sample against cross-validated soft matching",
        "",
        "Generated by `python scripts/models_vs_brain.py` (also run by "
        "`scripts/reproduce_paper.py`); every number below is what that run produced "
        f"({platform.machine()}, {os.cpu_count()} cores, Python "
        f"{platform.python_version()}, smd-dist {smd_dist.__version__}, {date.today()}, "
        f"{seconds:.0f} s).",
        "",
        "## Set-up",
        "",
        f"- **Brain**: the trained digits CNN `{setup.brain}`, held out. From each of its "
        f"layers {', '.join(f'`{a}`' for a in setup.areas)} (the *areas*), {setup.n_units} "
        "units are drawn at random among those that respond (are not constant) on the "
        f"{store.n_stimuli} stimuli, and independent Gaussian trial noise with "
        f"{setup.noise:g}× each unit's standard deviation is added (SNR 1, as for "
        "single-trial recordings).",
        f"- **Models**: every layer ({', '.join(LAYERS)}) of the other "
        f"{len({r.model for r in rows})} nets: trained and untrained, widths 8 and 16.",
        f"- **Stimuli**: nested random subsets of {', '.join(map(str, setup.stimuli))} of "
        f"the {store.n_stimuli} held-out digits images.",
        f"- **Scores**: the in-sample soft matching score `soft_matching_score(X, Y)` and "
        f"the cross-validated one, `soft_matching_cv(X, Y, cv={setup.cv}, "
        f"seed={setup.seed}, constant_neurons='drop')`: the plan is fitted on 4/5 of the "
        "stimuli and scored on the other 1/5, each part normalised on its own; model "
        "neurons constant on some fold's stimuli (dead or sparse ReLU units) are left out "
        "of both scores.",
        "- **Shuffled control**: the same model against the area's responses to a random "
        "permutation of the stimuli; the true score is 0, so whatever a score gives there "
        "is its bias.",
        "",
        "## How far the in-sample score is inflated",
        "",
        "Means over model layers and both areas (trained, untrained: real stimulus "
        "pairing; shuffled: the control, over all models).",
        "",
        "| stimuli | trained: in-sample | trained: CV | untrained: in-sample | "
        "untrained: CV | trained − untrained, in-sample | trained − untrained, CV | "
        "shuffled: in-sample | shuffled: CV |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for n in setup.stimuli:
        tr = _group(rows, n_stimuli=n, trained=True, shuffled=False)
        un = _group(rows, n_stimuli=n, trained=False, shuffled=False)
        sh = _group(rows, n_stimuli=n, shuffled=True)
        lines.append(
            f"| {n} | {_mean(tr, 'in_sample'):.3f} | {_mean(tr, 'cv'):.3f} | "
            f"{_mean(un, 'in_sample'):.3f} | {_mean(un, 'cv'):.3f} | "
            f"{_mean(tr, 'in_sample') - _mean(un, 'in_sample'):+.3f} | "
            f"{_mean(tr, 'cv') - _mean(un, 'cv'):+.3f} | "
            f"{_mean(sh, 'in_sample'):.3f} | {_mean(sh, 'cv'):+.3f} |"
        )
    lines += ["", *_width_lines(rows, setup), "", *_ranking_lines(rows, setup), ""]
    lines += _reading(rows, setup)
    lines += AGAINST_SECTION.splitlines()
    return "\n".join(lines).rstrip() + "\n"


def _width_lines(rows, setup) -> list[str]:
    lines = [
        "## The inflation grows with the model's width",
        "",
        "Spearman correlation, over model layers (both areas, real pairing), between the "
        "number of model neurons compared and the in-sample − CV gap; and the mean gap "
        "of the narrowest (logits, 10 neurons) and widest (conv2) layers.",
        "",
        "| stimuli | ρ(width, gap) | gap, logits | gap, conv2 | gap, shuffled control |",
        "|---|---|---|---|---|",
    ]
    for n in setup.stimuli:
        real = _group(rows, n_stimuli=n, shuffled=False)
        rho = spearmanr([r.n_neurons for r in real], [r.gap for r in real]).statistic
        lines.append(
            f"| {n} | {rho:+.2f} | {_mean(_group(real, layer='logits'), 'gap'):.3f} | "
            f"{_mean(_group(real, layer='conv2'), 'gap'):.3f} | "
            f"{_mean(_group(rows, n_stimuli=n, shuffled=True), 'gap'):.3f} |"
        )
    return lines


def _ranking_lines(rows, setup) -> list[str]:
    lines = [
        "## Which model layer matches each area",
        "",
        "Trained models, mean over nets per layer; the best layer of each column in bold. "
        "A model-selection study reads this table.",
        "",
    ]
    for area in setup.areas:
        lines += [
            f"**Area `{area}`**",
            "",
            "| stimuli | " + " | ".join(f"{layer} in-sample | {layer} CV" for layer in LAYERS)
            + " |",
            "|---|" + "---|---|" * len(LAYERS),
        ]
        for n in setup.stimuli:
            per = {
                layer: _group(rows, n_stimuli=n, area=area, layer=layer, trained=True,
                              shuffled=False)
                for layer in LAYERS
            }
            ins = {layer: _mean(g, "in_sample") for layer, g in per.items()}
            cv = {layer: _mean(g, "cv") for layer, g in per.items()}
            cells = []
            for layer in LAYERS:
                for table in (ins, cv):
                    v = f"{table[layer]:.3f}"
                    cells.append(f"**{v}**" if table[layer] == max(table.values()) else v)
            lines.append(f"| {n} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def _reading(rows, setup) -> list[str]:
    """The result in words, from the numbers above (no hand-written figures)."""
    small, large = setup.stimuli[0], setup.stimuli[-1]
    sh_small = _group(rows, n_stimuli=small, shuffled=True)
    sh_large = _group(rows, n_stimuli=large, shuffled=True)
    real_small = _group(rows, n_stimuli=small, shuffled=False)
    real_large = _group(rows, n_stimuli=large, shuffled=False)
    below = sum(r.cv < r.in_sample for r in rows if not r.shuffled)
    n_real = sum(not r.shuffled for r in rows)
    sep = {}
    for n in setup.stimuli:
        tr = _group(rows, n_stimuli=n, trained=True, shuffled=False)
        un = _group(rows, n_stimuli=n, trained=False, shuffled=False)
        sep[n] = {
            field: _mean(tr, field) - _mean(un, field) for field in ("in_sample", "cv", "gap")
        }
    trained = {n: _group(rows, n_stimuli=n, trained=True, shuffled=False)
               for n in (small, large)}

    def span(field):
        values = [sep[n][field] for n in setup.stimuli]
        return f"{min(values):+.3f} to {max(values):+.3f}"

    return [
        "## Reading",
        "",
        f"- The in-sample score is above the cross-validated one in {below} of {n_real} "
        "model × area × stimulus-set comparisons with the real stimulus pairing. On "
        f"shuffled stimuli, where nothing is shared, the in-sample score is "
        f"{_mean(sh_small, 'in_sample'):.3f} on average with {small} stimuli and "
        f"{_mean(sh_large, 'in_sample'):.3f} with {large}; the cross-validated score is "
        f"{_mean(sh_small, 'cv'):+.3f} and {_mean(sh_large, 'cv'):+.3f}.",
        f"- The gap (in-sample − CV) is {_mean(real_small, 'gap'):.3f} on average with "
        f"{small} stimuli and {_mean(real_large, 'gap'):.3f} with {large}; its Spearman "
        f"correlation with the model layer's width is {_rho_span(rows, setup)} over the "
        f"stimulus counts. From {small} to {large} stimuli the trained models' in-sample "
        f"score {_moves(trained, 'in_sample', small, large)} while their CV score "
        f"{_moves(trained, 'cv', small, large)}: the in-sample score is biased up by the "
        "noise it fits, the CV score down by plans fitted on fewer stimuli.",
        f"- Trained − untrained separation over the stimulus counts: {span('in_sample')} "
        f"in-sample, {span('cv')} cross-validated. The untrained nets' gap exceeds the "
        f"trained nets' by {-sep[small]['gap']:.3f} with {small} stimuli and "
        f"{-sep[large]['gap']:.3f} with {large}, so how far apart "
        "in-sample scores put the two kinds of model depends on how many stimuli were "
        "recorded; the cross-validated separation "
        + ("depends on it less." if _spread(sep, "cv") < _spread(sep, "in_sample")
           else "does not depend on it less here."),
        "- Each area best matched by the models' layer of the same type (mean over "
        "trained nets), by both scores and at every stimulus count: "
        + ("yes." if _same_best(rows, setup) else "no (see the table above)."),
    ]


#: How to run the same comparison with the engine, as a rectangle across two stores.
AGAINST_SECTION = """
## Models against recordings in another store

The tables above score arrays in memory. At scale — many models' layers against recorded
areas — the engine does it as a *rectangular* run: `compute_distances(models,
against=recordings)` compares every rep of the first store (rows, `rep_a`) with every rep
of the second (columns, `rep_b`), with the same resume, ledger, failures, progress and
cluster as an all-pairs run. The second store must hold the same stimuli in the same order:
both record the same stimulus ids (`ActivationStore.set_stimuli`, `smd-dist store import
--ids`), or neither records ids and the counts agree; otherwise the run is refused before
anything starts, naming both stores and the first differing id. This builds such a store
from the demo (run it where `smd-dist demo build demo-data` put the stores) and ranks each
model's best layer per area:

```python
import numpy as np

import smd_dist
from smd_dist import analysis
from smd_dist.store import ActivationStore

if __name__ == "__main__":  # the local cluster's workers import this file again
    models = ActivationStore("demo-data/digits", mode="r")
    # "Recordings": 20 noisy responsive units of each of two layers of one held-out net,
    # on the same stimuli in the same order (the ids are what the run checks).
    rng = np.random.default_rng(0)
    brain = ActivationStore("demo-data/recordings", mode="w")
    brain.set_stimuli(models.stimulus_ids)
    for area in ("conv2", "fc1"):
        A = models.read("cnn-w8-s0", area).astype(np.float64)
        R = A[:, rng.choice(np.flatnonzero(A.std(axis=0) > 0), 20, replace=False)]
        brain.write("monkey", area, R + R.std(axis=0) * rng.standard_normal(R.shape))
    ds = smd_dist.compute_distances(
        models,
        reps=[r.rep_id for r in models.list() if r.model != "cnn-w8-s0"],
        against=brain,  # or {"store": "demo-data/recordings", "reps": ["monkey/*"]}
        metrics=["soft_matching_score"],
        constant_neurons="drop",  # dead ReLU units: left out of every rep
        output="demo-results/models-vs-recordings.zarr",
    )
    print(ds["soft_matching_score"].to_pandas().round(3))
    best = analysis.best_matches(ds)  # each model's best layer per area, ranked
    print(best["layer"].to_pandas())
    print(best["rank"].to_pandas())
```

The same run from the command line (`smd-dist run models-vs-recordings.yaml`; `--against
PATTERN` replaces the `reps` of `against`):

```yaml
store: demo-data/digits
output: demo-results/models-vs-recordings.zarr
reps: [cnn-w16-s0, cnn-w16-s1, cnn-w8-s1]
against: {store: demo-data/recordings}   # or a list of patterns in `store`
metrics: [soft_matching_score]
preprocessing: {constant_neurons: drop}
```

`against` may also be patterns in the same store (`against=["monkey/*"]`); a rep in both
selections then meets itself and each pair is computed once. `smd_dist.pairwise(models,
against=areas)` is the same for arrays in memory. MDS and clustering need a square matrix
and refuse the rectangle; `analysis.plot_heatmap` draws it.
"""


def _moves(groups, field, small, large) -> str:
    a, b = _mean(groups[small], field), _mean(groups[large], field)
    return f"{'falls' if b < a else 'rises'} from {a:.3f} to {b:.3f}"


def _rho_span(rows, setup) -> str:
    rho = []
    for n in setup.stimuli:
        real = _group(rows, n_stimuli=n, shuffled=False)
        rho.append(spearmanr([r.n_neurons for r in real], [r.gap for r in real]).statistic)
    return f"{min(rho):+.2f} to {max(rho):+.2f}"


def _spread(sep, field) -> float:
    values = [v[field] for v in sep.values()]
    return max(values) - min(values)


def _same_best(rows, setup) -> bool:
    """Whether each area's best trained layer (mean over nets) is the area's own layer,
    for both scores and every stimulus count."""
    for area in setup.areas:
        for n in setup.stimuli:
            for field in ("in_sample", "cv"):
                means = {
                    layer: _mean(_group(rows, n_stimuli=n, area=area, layer=layer,
                                        trained=True, shuffled=False), field)
                    for layer in LAYERS
                }
                if max(means, key=means.get) != area:
                    return False
    return True


if __name__ == "__main__":
    raise SystemExit(main())
