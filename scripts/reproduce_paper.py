#!/usr/bin/env python
"""The soft matching paper's claims, checked on the offline demo store.

Builds the demo stores if missing (``smd-dist demo build``), computes every pair with the
engine, runs the rotation null for the pairs each claim needs, and writes
``docs/paper-results.md`` with figures in ``docs/figures/``. Everything is seeded; the
numbers in the report are whatever comes out.

    python scripts/reproduce_paper.py                    # full run (minutes on 2 cores)
    python scripts/reproduce_paper.py --n-draws 20       # quicker, coarser p-values

Claims (Khosla & Williams 2024):
1. same architecture, different seeds: is single-neuron tuning shared above chance (score vs
   the rotation null), and where in depth;
2. trained vs untrained networks;
3. different widths compared directly (no padding);
4. rotation sensitivity: soft matching vs Procrustes/CKA on the same pairs;
5. MiniLM layer by layer, pretrained vs random: matrix and MDS.

Then, beyond the paper: models × "brain", in-sample against cross-validated scores
(``scripts/models_vs_brain.py``, written to ``docs/models-vs-brain.md``).
"""

from __future__ import annotations

import argparse
import itertools
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import models_vs_brain
import numpy as np
import xarray as xr

import smd_dist
from smd_dist import analysis
from smd_dist.kernel import SolverError
from smd_dist.store import ActivationStore

ROOT = Path(__file__).resolve().parent.parent
METRICS = ("soft_matching", "soft_matching_score", "procrustes", "linear_cka")


@dataclass(frozen=True)
class Net:
    """One digits CNN as the demo store describes it (attrs of its reps)."""

    model: str
    width: int
    seed: int
    trained: bool
    accuracy: float


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(ROOT / "demo-data"), help="demo stores folder")
    parser.add_argument("--results", default=str(ROOT / "demo-results" / "paper"))
    parser.add_argument("--docs", default=str(ROOT / "docs"))
    parser.add_argument("--n-draws", type=int, default=100, help="rotation-null draws per pair")
    parser.add_argument("--seed", type=int, default=0, help="base seed of the rotation nulls")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)

    started = time.perf_counter()
    timings: dict[str, float] = {}
    data, results, docs = Path(args.data), Path(args.results), Path(args.docs)
    figures = docs / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    if not (data / "digits").exists() or not (data / "minilm").exists():
        t = time.perf_counter()
        subprocess.run(["smd-dist", "demo", "build", str(data), "--force"], check=True)
        timings["demo build"] = time.perf_counter() - t

    from smd_dist.engine.clusters import make_client

    report = Report(args)
    with make_client({"kind": "local", "n-workers": args.workers}, quiet=True) as client:
        digits = ActivationStore(str(data / "digits"), mode="r")
        minilm = ActivationStore(str(data / "minilm"), mode="r")
        t = time.perf_counter()
        ds_d = all_pairs(digits, results / "digits.zarr", client, report)
        timings["all pairs, digits"] = time.perf_counter() - t
        t = time.perf_counter()
        ds_m = all_pairs(minilm, results / "minilm.zarr", client, report)
        timings["all pairs, MiniLM"] = time.perf_counter() - t

        nets = digits_nets(digits)
        layers = list(dict.fromkeys(r.layer for r in digits.list()))
        report.setup(digits, minilm, nets, ds_d, ds_m)
        report.score_matrix(ds_d, figures)
        nulls = NullRunner(digits, ds_d, client, args.n_draws, args.seed, report.failures)

        t = time.perf_counter()
        report.seeds(nulls, nets, layers, figures)
        timings["1. seeds (nulls)"] = time.perf_counter() - t
        t = time.perf_counter()
        report.trained_vs_untrained(nulls, nets, layers, ds_d, figures)
        timings["2. trained vs untrained (nulls)"] = time.perf_counter() - t
        t = time.perf_counter()
        report.widths(nulls, nets, layers, ds_d)
        timings["3. widths (nulls)"] = time.perf_counter() - t
        report.nulls_vs_engine(nulls)
        t = time.perf_counter()
        report.rotation(digits, nets, layers, ds_d, figures, args.seed)
        timings["4. rotation sensitivity"] = time.perf_counter() - t
        t = time.perf_counter()
        mnulls = NullRunner(minilm, ds_m, client, args.n_draws, args.seed, report.failures)
        report.minilm(mnulls, ds_m, figures)
        timings["5. MiniLM (MDS, nulls)"] = time.perf_counter() - t
        t = time.perf_counter()
        brain_doc = models_vs_brain.run(digits, docs)
        report.add(
            "## 6. Beyond the paper: models × brain, cross-validated",
            "",
            f"Written to [{brain_doc.name}]({brain_doc.name}) by `scripts/models_vs_brain.py`.",
            "",
        )
        timings["6. models vs brain"] = time.perf_counter() - t

    timings["total"] = time.perf_counter() - started
    report.timing(timings)
    out = docs / "paper-results.md"
    out.write_text(report.text())
    print(f"wrote {out} and {len(list(figures.glob('*.png')))} figures in {figures}")
    return 0


# --- data --------------------------------------------------------------------------------


def digits_nets(store: ActivationStore) -> dict[str, Net]:
    nets = {}
    for record in store.list():
        a = record.attrs
        nets.setdefault(
            record.model,
            Net(
                record.model,
                int(a["width"]),
                int(a["seed"]),
                bool(a["trained"]),
                float(a.get("test_accuracy", float("nan"))),
            ),
        )
    return nets


def all_pairs(store, output, client, report) -> xr.Dataset:
    """Every pair with the engine, constant (dead) neurons dropped from every rep."""
    ds = smd_dist.compute_distances(
        store,
        metrics=METRICS,
        output=output,
        client=client,
        progress=False,
        constant_neurons="drop",
    )
    report.failures.extend(
        f"{Path(store.path).name}, engine: {line}" for line in ds.attrs["failed_pairs"]
    )
    return ds


#: Largest |Δ| between a rotation null's observed score and the engine's matrix that
#: counts as agreement (the same kernel on the same neurons: expected bit for bit).
AGREEMENT = 1e-12


def cross_check(results, ds, failures) -> str:
    """How the directly computed scores compare with the engine's matrix, and whether both
    left out the same constant neurons; each disagreement is also listed as a failure."""
    gaps, same_neurons = [], 0
    for r in done(results):
        a, b = r.labels
        engine = value(ds, "soft_matching_score", a, b)
        counts = (
            int(ds.n_constant_dropped_a.sel(rep_a=a)),
            int(ds.n_constant_dropped_a.sel(rep_a=b)),
        )
        gaps.append(abs(r.observed - engine))
        same_neurons += counts == r.dropped
        if not gaps[-1] <= AGREEMENT or counts != r.dropped:
            failures.append(
                f"{a} vs {b}: the rotation null scored {r.observed!r} with {r.dropped} "
                f"constant neurons left out, the engine {engine!r} with {counts}"
            )
    if not gaps:
        return "no finished rotation null to compare with"
    return (
        f"the observed scores of the {len(gaps)} rotation nulls agree with the engine's "
        f"`soft_matching_score` matrix to max |Δ| = {max(gaps):.1e}, the same constant "
        f"neurons left out in {same_neurons} of {len(gaps)} pairs"
    )


def rid(model: str, layer: str) -> str:
    return f"{model}/{layer}"


def value(ds: xr.Dataset, metric: str, a: str, b: str) -> float:
    return float(ds[metric].sel(rep_a=a, rep_b=b))


class NullRunner:
    """Rotation nulls of store pairs, cached, seeded per pair from one base seed."""

    def __init__(self, store, ds, client, n_draws, seed, failures):
        self.store, self.ds, self.client = store, ds, client
        self.n_draws, self.seed = n_draws, seed
        self.failures = failures
        self.cache: dict[tuple[str, str], analysis.RotationNull] = {}
        self.index = {r: i for i, r in enumerate(str(x) for x in ds.rep_a.values)}

    def __call__(self, a: str, b: str) -> analysis.RotationNull:
        if (a, b) not in self.cache:
            X = self.store.read(*a.split("/", 1))
            Y = self.store.read(*b.split("/", 1))
            # A distinct, reproducible seed per ordered pair.
            seed = [self.seed, self.index[a], self.index[b]]
            try:
                null = analysis.rotation_null(
                    X,
                    Y,
                    n_draws=self.n_draws,
                    seed=seed,
                    client=self.client,
                    labels=(a, b),
                    drop_constant=True,
                )
            except SolverError as err:
                # Reported, not hidden: the pair shows as nan and the failure is listed.
                self.failures.append(f"{a} vs {b}: {err}")
                nan = float("nan")
                null = analysis.RotationNull(nan, np.full(1, nan), nan, nan, 0, 0, (a, b))
            self.cache[(a, b)] = null
        return self.cache[(a, b)]


# --- report ------------------------------------------------------------------------------


def done(results) -> list:
    """The nulls that finished (a solver failure leaves a placeholder with no draws)."""
    return [r for r in results if r.n_draws > 0]


def failed(results) -> str:
    n = sum(r.n_draws == 0 for r in results)
    return f"; {n} pair(s) failed, see Failures" if n else ""


def fmt_p(p: float, n: int) -> str:
    return f"≤ {1 / (n + 1):.3f}" if p <= 1 / (n + 1) + 1e-12 else f"{p:.3f}"


class Report:
    def __init__(self, args):
        self.args = args
        self.parts: list[str] = []
        self.failures: list[str] = []

    def add(self, *lines: str) -> None:
        self.parts.extend(lines)

    def text(self) -> str:
        return "\n".join(self.parts).rstrip() + "\n"

    # -- set-up ------------------------------------------------------------------------
    def setup(self, digits, minilm, nets, ds_d, ds_m):
        n = self.args.n_draws
        self.add(
            "# The paper's claims on real networks",
            "",
            "Generated by `python scripts/reproduce_paper.py` "
            f"(`--n-draws {n} --seed {self.args.seed}`); every number below is what that run "
            "produced. Claims from Khosla & Williams (2024), *Soft matching distance: a metric "
            "on neural representations that captures single-neuron tuning*.",
            "",
            "## Set-up",
            "",
            f"- Digits store: {digits.n_stimuli} held-out 8×8 digits images; "
            f"{len(nets)} CNNs (widths {sorted({x.width for x in nets.values()})}, "
            f"seeds {sorted({x.seed for x in nets.values()})}, each trained and at its "
            f"untrained initialisation); {ds_d.sizes['rep_a']} representations.",
            f"- MiniLM store: {minilm.n_stimuli} sentences; "
            f"{len(set(str(m) for m in ds_m.model_a.values))} models "
            f"({', '.join(dict.fromkeys(str(m) for m in ds_m.model_a.values))}); "
            f"{ds_m.sizes['rep_a']} representations (mean over tokens).",
            f"- Metrics computed for every pair by `smd_dist.compute_distances`: "
            f"{', '.join(analysis.metric_names(ds_d))}; preprocessing: centred neurons, "
            "neurons constant over the stimuli (dead ReLUs) dropped from every rep "
            "(`constant_neurons=\"drop\"`; counts below).",
            f"- Rotation null: {n} Haar-random rotations of the second representation's "
            "neuron basis per pair (`smd_dist.analysis.rotation_null`), seeded from base "
            f"seed {self.args.seed} and the pair; p = (1 + #null ≥ observed)/(1 + {n}), so "
            f"the smallest attainable p is {1 / (n + 1):.3f}.",
            f"- Machine: {platform.machine()}, {os.cpu_count()} cores, Python "
            f"{platform.python_version()}, smd-dist {smd_dist.__version__}; run on "
            f"{time.strftime('%Y-%m-%d')}.",
            "",
            "| model | width | seed | trained | test accuracy |",
            "|---|---|---|---|---|",
        )
        for net in nets.values():
            self.add(
                f"| {net.model} | {net.width} | {net.seed} | {net.trained} | {net.accuracy:.3f} |"
            )
        widths, dead = {}, {}
        engine = dict(
            zip(
                (str(r) for r in ds_d.rep_a.values),
                ds_d.n_constant_dropped_a.values.tolist(),
                strict=True,
            )
        )
        for r in digits.list():
            widths.setdefault(r.layer, set()).add(r.n_neurons)
            live = analysis.live_neurons(digits.read(r.model, r.layer))
            dead.setdefault(r.layer, {})[r.model] = int((~live).sum())
            if engine.get(r.rep_id) != dead[r.layer][r.model]:
                self.failures.append(
                    f"{r.rep_id}: the engine dropped {engine.get(r.rep_id)} constant neurons, "
                    f"analysis.live_neurons finds {dead[r.layer][r.model]}"
                )
        minilm_dead = sorted(set(ds_m.n_constant_dropped_a.values.tolist()))
        layers = list(dead)
        self.add(
            "",
            "Neurons per layer (digits): "
            + "; ".join(f"{layer}: {sorted(w)}" for layer, w in widths.items())
            + ". MiniLM: "
            + f"{sorted({r.n_neurons for r in minilm.list()})} per layer "
            + f"(constant neurons dropped per rep: {minilm_dead}).",
            "",
            "Constant (dead) neurons over the stimuli, dropped by the engine in each digits "
            "rep (`n_constant_dropped_a`, checked against `analysis.live_neurons`):",
            "",
            "| model | " + " | ".join(layers) + " |",
            "|---|" + "---|" * len(layers),
        )
        for model in nets:
            self.add(f"| {model} | " + " | ".join(str(dead[k][model]) for k in layers) + " |")
        self.add("")

    def score_matrix(self, ds, figures):
        """The engine's soft matching score matrix on the digits nets."""
        analysis.plot_heatmap(
            ds, figures / "digits_score_heatmap.png", metric="soft_matching_score",
            max_labels=60, title="digits: soft matching score (engine, constant neurons dropped)",
        )
        layer_of = np.array([str(x) for x in ds.layer_a.values])
        trained = np.array([not str(m).endswith("-untrained") for m in ds.model_a.values])
        S = ds["soft_matching_score"].values
        self.add(
            "## The engine's soft matching score matrix (digits)",
            "",
            f"`compute_distances(..., metrics=[..., \"soft_matching_score\"], "
            f"constant_neurons=\"drop\")` over all {ds.sizes['rep_a']} digits reps "
            f"({int(np.isfinite(S).sum())} finite entries of {S.size}, "
            f"{ds.attrs['n_failed_pairs']} failed pairs). Mean score over pairs of different "
            "networks, same layer:",
            "",
            "| layer | trained–trained | untrained–untrained | trained–untrained |",
            "|---|---|---|---|",
        )
        for layer in dict.fromkeys(layer_of):
            idx = np.flatnonzero(layer_of == layer)
            cells = []
            for ta, tb in ((True, True), (False, False), (True, False)):
                vals = [
                    S[i, j]
                    for i in idx
                    for j in idx
                    if i < j and {bool(trained[i]), bool(trained[j])} == {ta, tb}
                ]
                cells.append(f"{np.mean(vals):.3f} ({len(vals)} pairs)")
            self.add(f"| {layer} | " + " | ".join(cells) + " |")
        self.add("", "![digits score matrix](figures/digits_score_heatmap.png)", "")

    def nulls_vs_engine(self, nulls):
        """Every digits rotation null's observed score against the engine's matrix."""
        self.add(
            "## Rotation nulls against the engine's matrix (digits)",
            "",
            "Each rotation null scores its pair with the public `soft_matching_score` on the "
            "neurons `analysis.live_neurons` keeps; cross-check: "
            f"{cross_check(list(nulls.cache.values()), nulls.ds, self.failures)}.",
            "",
        )

    # -- 1 -----------------------------------------------------------------------------
    def seeds(self, nulls, nets, layers, figures):
        n = self.args.n_draws
        self.add(
            "## 1. Same architecture, different seeds: is tuning shared above chance?",
            "",
            "For each width and layer, every pair of trained networks with different seeds: "
            "the observed soft matching score against its rotation null.",
            "",
            "| width | layer | pair | score | null mean ± sd | z | p |",
            "|---|---|---|---|---|---|---|",
        )
        per_layer: dict[str, list] = {layer: [] for layer in layers}
        for width in sorted({x.width for x in nets.values()}):
            group = sorted(
                (x for x in nets.values() if x.trained and x.width == width), key=lambda x: x.seed
            )
            for layer in layers:
                for a, b in itertools.combinations(group, 2):
                    r = nulls(rid(a.model, layer), rid(b.model, layer))
                    per_layer[layer].append(r)
                    self.add(
                        f"| {width} | {layer} | s{a.seed}–s{b.seed} | {r.observed:.3f} | "
                        f"{r.null_mean:.3f} ± {r.null_std:.3f} | {r.z_score:.1f} | "
                        f"{fmt_p(r.p_value, n)} |"
                    )
        self.add(
            "",
            "Scores are computed on the neurons that vary over the stimuli (dead ReLUs, "
            "constant on every image, have no tuning curve to correlate and are left out, as "
            "the engine leaves them out; see the cross-check below).",
            "",
            "Summary by depth:",
            "",
        )
        for layer, rs in per_layer.items():
            ok = done(rs)
            if not ok:
                continue
            above = sum(r.p_value <= 0.05 for r in ok)
            self.add(
                f"- **{layer}**: score {np.mean([r.observed for r in ok]):.3f} "
                f"(null {np.mean([r.null_mean for r in ok]):.3f}), z from "
                f"{np.min([r.z_score for r in ok]):.1f} to {np.max([r.z_score for r in ok]):.1f}; "
                f"{above}/{len(ok)} pairs above chance at p ≤ 0.05{failed(rs)}."
            )
        self._null_figure(
            per_layer,
            figures / "seeds_null.png",
            "trained nets, different seeds: score vs rotation null",
        )
        self.add("", "![seeds vs null](figures/seeds_null.png)", "")

    def _null_figure(self, groups, path, title):
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        fig = Figure(figsize=(7, 4), layout="constrained")
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        names = [k for k, v in groups.items() if done(v)]
        for i, name in enumerate(names):
            rs = groups[name]
            rs = done(rs)
            pooled = np.concatenate([r.null for r in rs])
            parts = ax.violinplot([pooled], positions=[i], widths=0.7, showextrema=False)
            for body in parts["bodies"]:
                body.set_alpha(0.35)
            jitter = np.linspace(-0.12, 0.12, len(rs)) if len(rs) > 1 else [0.0]
            ax.scatter(
                i + np.asarray(jitter),
                [r.observed for r in rs],
                color="C3",
                zorder=3,
                s=22,
                label="observed" if i == 0 else None,
            )
        ax.set_xticks(range(len(names)), names)
        ax.set_ylabel("soft matching score")
        ax.set_title(title)
        ax.legend(loc="upper left", frameon=False)
        fig.savefig(path, dpi=120)

    # -- 2 -----------------------------------------------------------------------------
    def trained_vs_untrained(self, nulls, nets, layers, ds, figures):
        n = self.args.n_draws
        self.add(
            "## 2. Trained vs untrained networks",
            "",
            "Mean soft matching score per layer for three kinds of pairs (same width): "
            "trained nets of different seeds, untrained nets of different seeds, and each "
            "trained net against its own initialisation. p: the largest rotation-null p over "
            "the pairs of that kind.",
            "",
            "| layer | trained–trained | untrained–untrained | trained–own init |",
            "|---|---|---|---|",
        )
        kinds = {"trained–trained": {}, "untrained–untrained": {}, "trained–own init": {}}
        for layer in layers:
            for key in kinds:
                kinds[key][layer] = []
            for width in sorted({x.width for x in nets.values()}):
                same = [x for x in nets.values() if x.width == width]
                for trained, key in ((True, "trained–trained"), (False, "untrained–untrained")):
                    group = sorted((x for x in same if x.trained == trained), key=lambda x: x.seed)
                    for a, b in itertools.combinations(group, 2):
                        kinds[key][layer].append(nulls(rid(a.model, layer), rid(b.model, layer)))
                for a in (x for x in same if x.trained):
                    init = next((x for x in same if not x.trained and x.seed == a.seed), None)
                    if init is not None:
                        kinds["trained–own init"][layer].append(
                            nulls(rid(a.model, layer), rid(init.model, layer))
                        )
            cells = []
            for key in kinds:
                rs = kinds[key][layer]
                ok = done(rs)
                if not ok:
                    cells.append("–")
                    continue
                cells.append(
                    f"{np.mean([r.observed for r in ok]):.3f} "
                    f"(null {np.mean([r.null_mean for r in ok]):.3f}, "
                    f"max p {fmt_p(np.max([r.p_value for r in ok]), n)}{failed(rs)})"
                )
            self.add(f"| {layer} | " + " | ".join(cells) + " |")
        self._kinds_figure(kinds, layers, figures / "trained_untrained.png")
        analysis.plot_heatmap(
            ds, figures / "digits_heatmap.png", metric="soft_matching", max_labels=60
        )
        self.add(
            "",
            "![trained vs untrained](figures/trained_untrained.png)",
            "",
            "The whole digits matrix (soft matching distance; lines separate models). The "
            "distance is in activation units, so each layer's scale dominates:",
            "",
            "![digits matrix](figures/digits_heatmap.png)",
            "",
            "Within one layer, the 12 networks clustered on the soft matching distance "
            "(average linkage, cut into two clusters):",
            "",
            "| layer | cluster: trained / untrained members | cophenetic r |",
            "|---|---|---|",
        )
        images = []
        for layer in layers:
            sub = analysis.select(ds, layers=layer)
            path = figures / f"digits_{layer}_heatmap.png"
            analysis.plot_heatmap(
                sub,
                path,
                metric="soft_matching",
                figsize=(6.5, 5.5),
                dpi=100,
                title=f"{layer}: soft matching distance",
            )
            images.append(f"![{layer}](figures/{path.name})")
            tree = analysis.cluster(sub, metric="soft_matching", n_clusters=2)
            models = [str(m) for m in tree.clusters.model.values]
            groups = []
            for c in sorted(set(tree.clusters.values.tolist())):
                members = [m for m, k in zip(models, tree.clusters.values, strict=True) if k == c]
                n_trained = sum(nets[m].trained for m in members)
                groups.append(f"{n_trained} / {len(members) - n_trained}")
            self.add(f"| {layer} | {'; '.join(groups)} | {tree.cophenetic_correlation:.3f} |")
        if layers:
            tree = analysis.cluster(analysis.select(ds, layers=layers[0]), metric="soft_matching")
            analysis.plot_dendrogram(tree, figures / f"digits_{layers[0]}_dendrogram.png")
            images.append(f"![{layers[0]} dendrogram](figures/digits_{layers[0]}_dendrogram.png)")
        self.add("", " ".join(images), "")

    def _kinds_figure(self, kinds, layers, path):
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        fig = Figure(figsize=(7, 4), layout="constrained")
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        x = np.arange(len(layers))
        for i, (key, by_layer) in enumerate(kinds.items()):
            obs = [
                np.mean([r.observed for r in done(by_layer[k])]) if done(by_layer[k]) else np.nan
                for k in layers
            ]
            null = [
                np.mean([r.null_mean for r in done(by_layer[k])]) if done(by_layer[k]) else np.nan
                for k in layers
            ]
            ax.plot(x, obs, "o-", color=f"C{i}", label=key)
            ax.plot(x, null, "o:", color=f"C{i}", alpha=0.5, label=f"{key} null")
        ax.set_xticks(x, layers)
        ax.set_ylabel("soft matching score")
        ax.legend(fontsize=7, frameon=False)
        ax.set_title("observed (solid) vs rotation-null mean (dotted)")
        fig.savefig(path, dpi=120)

    # -- 3 -----------------------------------------------------------------------------
    def widths(self, nulls, nets, layers, ds):
        n = self.args.n_draws
        widths = sorted({x.width for x in nets.values()})
        if len(widths) < 2:
            self.add("## 3. Different widths", "", "Only one width in the store.", "")
            return
        w0, w1 = widths[0], widths[-1]
        self.add(
            f"## 3. Different widths compared directly (width {w0} vs {w1})",
            "",
            "Trained nets of different widths compared layer by layer with no padding (the "
            "transport plan has marginals 1/Nx and 1/Ny): mean distance and score over all "
            "cross-width pairs; the null and its largest p over the same-seed cross-width "
            "pairs. For reference the mean score of same-width pairs of different seeds.",
            "",
            f"| layer | neurons | distance w{w0}–w{w1} | score w{w0}–w{w1} (null, max p) | "
            "score same width, other seed |",
            "|---|---|---|---|---|",
        )
        trained = [x for x in nets.values() if x.trained]
        for layer in layers:
            cross = [(a, b) for a in trained for b in trained if a.width == w0 and b.width == w1]
            # Nulls for the same-seed pairs only: they are the costliest part of the run.
            rs = [
                nulls(rid(a.model, layer), rid(b.model, layer))
                for a, b in cross
                if a.seed == b.seed
            ]
            dist = [
                value(ds, "soft_matching", rid(a.model, layer), rid(b.model, layer))
                for a, b in cross
            ]
            same = done(
                nulls(rid(a.model, layer), rid(b.model, layer))
                for a, b in itertools.combinations(trained, 2)
                if a.width == b.width
            )
            ok = done(rs)
            na = int(ds.n_neurons_a.sel(rep_a=rid(cross[0][0].model, layer)))
            nb = int(ds.n_neurons_a.sel(rep_a=rid(cross[0][1].model, layer)))
            self.add(
                f"| {layer} | {na} vs {nb} | {np.mean(dist):.3f} | "
                f"{np.mean([r.observed for r in ok]):.3f} "
                f"({np.mean([r.null_mean for r in ok]):.3f}, "
                f"{fmt_p(np.max([r.p_value for r in ok]), n)}{failed(rs)}) | "
                f"{np.mean([r.observed for r in same]):.3f} |"
            )
        self.add("")

    # -- 4 -----------------------------------------------------------------------------
    def rotation(self, store, nets, layers, ds, figures, seed):
        trained = sorted((x for x in nets.values() if x.trained), key=lambda x: (-x.width, x.seed))
        ref = trained[0]
        other = next(x for x in trained if x.width == ref.width and x.seed != ref.seed)
        rng = np.random.default_rng([seed, 4])
        self.add(
            "## 4. Rotation sensitivity",
            "",
            f"Each layer of {ref.model} (X) against a copy of itself with its neuron basis "
            "rotated by one Haar-random orthogonal matrix (XQ, seeded), and for scale against "
            f"the same layer of {other.model} (Y); public kernels, constant neurons left out "
            "of both. Each cell: rotated copy / other seed.",
            "",
            "| layer | neurons | soft matching distance | soft matching score | "
            "Procrustes distance | linear CKA |",
            "|---|---|---|---|---|---|",
        )
        for layer in layers:
            X = store.read(ref.model, layer).astype(np.float64)
            Y = store.read(other.model, layer).astype(np.float64)
            X, Y = X[:, analysis.live_neurons(X)], Y[:, analysis.live_neurons(Y)]
            XQ = X @ analysis.haar_orthogonal(X.shape[1], rng)
            cells = []
            for fn, fmt in (
                (smd_dist.soft_matching_distance, ".3f"),
                (smd_dist.soft_matching_score, ".3f"),
                (smd_dist.procrustes_distance, ".3g"),
                (smd_dist.linear_cka, ".4f"),
            ):
                cells.append(f"{fn(X, XQ):{fmt}} / {fn(X, Y):{fmt}}")
            self.add(f"| {layer} | {X.shape[1]} | " + " | ".join(cells) + " |")
        # Across every pair of the matrix: how the rotation-sensitive and rotation-invariant
        # measures order the same pairs.
        from scipy.stats import spearmanr

        names = [m for m in ("procrustes", "linear_cka") if m in ds]
        ids = [str(r) for r in ds.rep_a.values]
        i, j = np.triu_indices(len(ids), k=1)
        sm = ds["soft_matching"].values[i, j]
        layer_of = np.array([str(x) for x in ds.layer_a.values])
        same = layer_of[i] == layer_of[j]
        self.add(
            "",
            "Over the pairs of the digits matrix (upper triangle), how the soft matching "
            "distance and the rotation-invariant measures order the same pairs: all pairs "
            "(dominated by the activation scale of each layer) and pairs of the same layer "
            "in different networks.",
            "",
        )
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        fig = Figure(figsize=(4 * max(len(names), 1), 3.8), layout="constrained")
        FigureCanvasAgg(fig)
        for k, name in enumerate(names):
            other = ds[name].values[i, j]
            ok = np.isfinite(other) & np.isfinite(sm)
            rho = spearmanr(sm[ok], other[ok]).statistic
            rho_same = spearmanr(sm[ok & same], other[ok & same]).statistic
            self.add(
                f"- Spearman ρ(soft matching, {name}) = {rho:.3f} over all {ok.sum()} pairs; "
                f"{rho_same:.3f} over the {(ok & same).sum()} same-layer pairs."
            )
            ax = fig.add_subplot(1, len(names), k + 1)
            ax.scatter(
                other[ok & ~same],
                sm[ok & ~same],
                s=5,
                alpha=0.3,
                color="0.6",
                label="different layers",
            )
            ax.scatter(
                other[ok & same], sm[ok & same], s=8, alpha=0.7, color="C3", label="same layer"
            )
            ax.set_xlabel(name)
            ax.set_ylabel("soft matching distance")
            ax.set_title(f"ρ = {rho:.2f} (same layer {rho_same:.2f})")
            ax.legend(fontsize=7, frameon=False)
        fig.savefig(figures / "rotation_sensitivity.png", dpi=120)
        self.add(
            "", "![soft matching vs rotation-invariant](figures/rotation_sensitivity.png)", ""
        )

    # -- 5 -----------------------------------------------------------------------------
    def minilm(self, nulls, ds, figures):
        from scipy.stats import spearmanr

        n = self.args.n_draws
        models = list(dict.fromkeys(str(m) for m in ds.model_a.values))
        emb = analysis.metric_mds(ds, metric="soft_matching")
        cmds = analysis.classical_mds(ds, metric="soft_matching")
        analysis.plot_heatmap(ds, figures / "minilm_heatmap.png", metric="soft_matching")
        analysis.plot_mds(emb, figures / "minilm_mds.png")
        self.add(
            "## 5. MiniLM layer by layer, pretrained vs random",
            "",
            f"Soft matching distance between every pair of the {ds.sizes['rep_a']} MiniLM "
            f"representations; metric MDS (seeded, from the classical solution): stress-1 "
            f"{emb.stress:.3f}; classical MDS stress-1 {cmds.stress:.3f}, negative eigenvalue "
            f"mass {cmds.negative_mass:.3f}.",
            "",
            "![MiniLM matrix](figures/minilm_heatmap.png)",
            "![MiniLM MDS](figures/minilm_mds.png)",
            "",
            "Depth structure within each model: Spearman ρ between layer separation |i − j| "
            "and distance, and the distance between consecutive layers.",
            "",
        )
        for model in models:
            sub = analysis.select(ds, models=model)
            D = sub["soft_matching"].values
            k = len(D)
            i, j = np.triu_indices(k, k=1)
            rho = spearmanr(np.abs(i - j), D[i, j]).statistic
            steps = ", ".join(f"{D[t, t + 1]:.3f}" for t in range(k - 1))
            self.add(f"- **{model}**: ρ = {rho:.3f}; consecutive: {steps}.")
        if len(models) >= 2:
            a, b = models[0], models[1]
            layers = [str(x) for x in analysis.select(ds, models=a).layer_a.values]
            self.add(
                "",
                f"Same layer, {a} vs {b}: soft matching score against the rotation null.",
                "",
                "| layer | score | null mean ± sd | z | p |",
                "|---|---|---|---|---|",
            )
            for layer in layers:
                if rid(b, layer) not in set(str(r) for r in ds.rep_a.values):
                    continue
                r = nulls(rid(a, layer), rid(b, layer))
                self.add(
                    f"| {layer} | {r.observed:.3f} | {r.null_mean:.3f} ± {r.null_std:.3f} | "
                    f"{r.z_score:.1f} | {fmt_p(r.p_value, n)} |"
                )
            self.add(
                "",
                f"Consecutive layers within {a}: score against the rotation null.",
                "",
                "| pair | score | null mean ± sd | z | p |",
                "|---|---|---|---|---|",
            )
            for la, lb in itertools.pairwise(layers):
                r = nulls(rid(a, la), rid(a, lb))
                self.add(
                    f"| {la} → {lb} | {r.observed:.3f} | {r.null_mean:.3f} ± "
                    f"{r.null_std:.3f} | {r.z_score:.1f} | {fmt_p(r.p_value, n)} |"
                )
            self.add(
                "",
                f"Cross-check of the directly computed scores: "
                f"{cross_check(list(nulls.cache.values()), ds, self.failures)}.",
            )
        self.add("")

    def timing(self, timings):
        self.add(
            "## Failures",
            "",
            f"{len(self.failures)} failure(s) among engine pairs, rotation nulls (a null "
            "stopped on a solver error reads nan and the summaries leave it out) and the "
            "cross-checks of the nulls and the constant-neuron counts against the engine"
            + (":" if self.failures else "."),
            "",
            *(f"- {f}" for f in self.failures),
            *([""] if self.failures else []),
        )
        self.add("## Run time", "", "| step | seconds |", "|---|---|")
        for step, seconds in timings.items():
            self.add(f"| {step} | {seconds:.1f} |")
        self.add("")


if __name__ == "__main__":
    sys.exit(main())
