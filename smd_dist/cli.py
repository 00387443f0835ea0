"""Command line: ``smd-dist`` (also ``python -m smd_dist``).

Imports of heavy modules (torch, dask) happen inside commands so ``--help`` stays fast.
"""

from __future__ import annotations

import sys

import click

#: Exit codes of every command.
EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130


def _fail(message: str, code: int = EXIT_BAD_INPUT):
    """Print ``smd-dist: error: <message>`` to stderr and exit with ``code``."""
    click.echo(f"smd-dist: error: {message}", err=True)
    sys.exit(code)


class _Main(click.Group):
    """The command group, with one exit-code scheme and one message prefix for every
    command: 0 ok, 1 some items failed (pairs, verified reps), 2 bad input or config
    (``smd-dist: error: ...``), 130 interrupted."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.exceptions.Abort:  # Ctrl-C outside a run
            click.echo("smd-dist: interrupted", err=True)
            code = EXIT_INTERRUPTED
        except click.UsageError as err:
            hint = ""
            if err.ctx is not None:
                hint = f"\nTry '{err.ctx.command_path} {err.ctx.help_option_names[0]}' for help."
            click.echo(f"smd-dist: error: {err.format_message()}{hint}", err=True)
            code = EXIT_BAD_INPUT
        except click.ClickException as err:
            click.echo(f"smd-dist: error: {err.format_message()}", err=True)
            code = EXIT_BAD_INPUT
        except (ValueError, OSError) as err:  # smd-dist's input errors are ValueErrors
            click.echo(f"smd-dist: error: {err}", err=True)
            code = EXIT_BAD_INPUT
        if not standalone_mode:
            return code
        sys.exit(code if isinstance(code, int) else EXIT_OK)


@click.group(cls=_Main, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="smd-dist")
def main() -> None:
    """Soft matching distances between every pair of neural representations.

    Exit codes: 0 ok, 1 some pairs failed, 2 bad input or config, 130 interrupted.
    """


# --- run / status / info / config (engine) ---------------------------------------------
@main.command("run")
@click.argument("config_path", metavar="CONFIG", type=click.Path(dir_okay=False))
@click.option("--dry-run", is_flag=True,
              help="Say what the run would do (pairs, memory) and write nothing.")
@click.option("--fresh", is_flag=True,
              help="Discard the output's existing results first (e.g. written with other "
                   "settings).")
@click.option("--output", "output_override", type=click.Path(),
              help="Write here instead of the config's output.")
@click.option("--reps", "reps_override", multiple=True,
              help="Glob on 'model/layer' or a model name, instead of the config's reps "
                   "(repeatable).")
@click.option("--against", "against_override", multiple=True, metavar="PATTERN",
              help="Compare the reps against these (glob on 'model/layer' or a model name; "
                   "repeatable) instead of the config's against reps, in the store its "
                   "'against:' names (the run's own store by default).")
@click.option("--no-progress", is_flag=True,
              help="Print nothing while it runs (no cluster line, no progress bar).")
def run(config_path, dry_run, fresh, output_override, reps_override, against_override,
        no_progress) -> None:
    """Compute every pair named by the run CONFIG (YAML) and write the labeled matrix.

    With 'against:' in the config (or --against) the matrix is the reps (rows) against a
    second selection (columns), in the same store or another with the same stimuli.

    Exits 0 when every pair succeeded, 1 when some pairs failed (they are recorded in the
    output with their errors; a rerun retries only them), 2 on bad input or config, 130
    when interrupted (Ctrl-C: the pairs finished are saved; the same command resumes).
    """
    import os

    from smd_dist.config import load_run_config
    from smd_dist.engine import RunInterrupted, RunReport, compute_distances, plan_run

    cfg = load_run_config(config_path)
    if output_override:
        cfg["output"] = os.path.abspath(output_override)
    if reps_override:
        cfg["reps"] = list(reps_override)
    if against_override:
        against = cfg.get("against")
        cfg["against"] = (
            {**against, "reps": list(against_override)} if isinstance(against, dict)
            else list(against_override)
        )
    prep = cfg.get("preprocessing") or {}
    options = {
        "reps": cfg.get("reps"),
        "against": cfg.get("against"),
        "metrics": cfg.get("metrics") or ("soft_matching",),
        "output": cfg["output"],
        "resume": cfg.get("resume", True),
        "fresh": fresh,
        "center": prep.get("center"),
        "normalize": prep.get("normalize", "default"),
        "constant_neurons": prep.get("constant_neurons"),
        "device": cfg.get("device"),
        "cluster": cfg.get("cluster"),
        "engine": cfg.get("engine"),
    }
    if dry_run:
        _print_plan(plan_run(cfg["store"], **options))
        return
    report = RunReport(0, 0, 0)
    try:
        ds = compute_distances(
            cfg["store"], **options, progress=not no_progress, run_config=cfg, report=report
        )
    except RunInterrupted as stop:
        click.echo(
            f"smd-dist: interrupted: {stop.n_saved} of {stop.n_pairs} pairs saved; run the "
            "same command again to resume",
            err=True,
        )
        sys.exit(EXIT_INTERRUPTED)
    names = [str(v) for v in ds.data_vars if "kind" in ds[v].attrs]
    shape = (f"{report.n_reps} reps" if "against_store" not in ds.attrs
             else f"{ds.sizes['rep_a']} reps against {ds.sizes['rep_b']}")
    click.echo(
        f"{report.n_pairs} pairs of {shape}: {report.n_done_before} already done, "
        f"{report.n_computed} computed in {report.seconds:.1f} s; metrics {', '.join(names)}; "
        f"output {cfg['output']}"
    )
    if report.failed:
        click.echo(f"smd-dist: {len(report.failed)} pair result(s) failed:", err=True)
        for line in report.failed:
            click.echo(f"  {line}", err=True)
        sys.exit(EXIT_FAILED)


def _size(n_bytes: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n_bytes >= scale:
            return f"{n_bytes / scale:.1f} {unit}"
    return f"{n_bytes} B"


def _print_plan(plan) -> None:
    shown = ", ".join(plan.reps[:6]) + (f", ... ({len(plan.reps) - 6} more)"
                                         if len(plan.reps) > 6 else "")
    click.echo(f"store     {plan.store}")
    click.echo(f"output    {plan.output} ({plan.output_state})")
    click.echo(f"reps      {len(plan.reps)}: {shown}")
    if plan.against is not None:
        against = ", ".join(plan.against_reps[:6]) + (
            f", ... ({len(plan.against_reps) - 6} more)" if len(plan.against_reps) > 6 else "")
        click.echo(f"against   {len(plan.against_reps)} in {plan.against}: {against}")
    click.echo(f"metrics   {', '.join(plan.metrics)}")
    click.echo(f"pairs     {plan.n_pairs}: {plan.n_done} already done, {plan.n_todo} to compute")
    if plan.largest_pair:
        click.echo(
            f"memory    per worker thread: about {_size(plan.largest_pair_bytes)} for the "
            f"largest pair ({' vs '.join(plan.largest_pair)}), "
            f"{_size(plan.median_pair_bytes)} for the median one"
        )
    cluster = {k: v for k, v in plan.cluster.items() if v is not None and k != "kind"}
    click.echo(f"cluster   {plan.cluster['kind']} {cluster}")
    if plan.output_state.startswith("incompatible"):
        _fail(f"the run would be refused: {plan.output_state[len('incompatible: '):]}; "
              "--fresh discards the output's results")
    click.echo("dry run: nothing was computed or written")


@main.command("status")
@click.argument("output", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print the status as JSON.")
def status(output: str, as_json: bool) -> None:
    """How many pairs of OUTPUT are done, which failed, and whether a run holds it."""
    import json

    from smd_dist.engine import output_status

    info = output_status(output)
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    click.echo(f"output      {info['path']}")
    click.echo(f"store       {info['store']}")
    if info["against"]:
        click.echo(f"against     {len(info['against']['reps'])} reps in "
                   f"{info['against']['store']}")
    click.echo(f"metrics     {', '.join(info['metrics'] or [])}")
    click.echo(f"pairs       {info['pairs_with_results']} of {info['pairs_total']} have results")
    click.echo(f"failed      {len(info['failed'])}")
    for line in info["failed"]:
        click.echo(f"  {line}")
    if info["incomplete_parts"]:
        n_parts = len(info["incomplete_parts"])
        click.echo(f"incomplete  {n_parts} ledger part(s) from an interrupted write")
    running = info["running"]
    click.echo(
        "running     " + (f"pid {running['pid']} on {running['host']} since {running['since']}"
                          if running else "no")
    )
    click.echo(f"assembled   {'yes' if info['assembled'] else 'no (run not finished)'}")


@main.command("info")
def info() -> None:
    """Versions, devices, metrics and where configuration comes from."""
    import platform

    import torch

    from smd_dist import __version__, metrics
    from smd_dist.config import DEFAULTS_PATH

    click.echo(f"smd-dist {__version__} on Python {platform.python_version()}")
    click.echo(f"torch {torch.__version__}; CUDA available: {torch.cuda.is_available()}")
    click.echo(f"metrics: {', '.join(metrics.available())}")
    click.echo(f"defaults: {DEFAULTS_PATH}")
    click.echo("overrides: ~/.config/dask/*.yaml, then DASK_SMD_DIST__* environment variables")


@main.command("config")
def show_config() -> None:
    """Print the effective ``smd-dist`` configuration (defaults, user files, environment)."""
    import dask.config
    import yaml

    import smd_dist.config  # noqa: F401  (registers the package defaults)

    click.echo(yaml.safe_dump({"smd-dist": dask.config.get("smd-dist")}, sort_keys=False))


# --- store ls / verify / import (store) -------------------------------------------------
@main.group("store")
def store_group() -> None:
    """An activation store: list, verify, import arrays."""


@store_group.command("ls")
@click.argument("store", type=click.Path(exists=True, file_okay=False))
def store_ls(store: str) -> None:
    """List the reps of STORE in its order (models as written, layers in depth order)."""
    from smd_dist.store import ActivationStore

    opened = ActivationStore(store, mode="r")
    records = opened.list()
    click.echo(f"{len(records)} reps, {opened.n_stimuli or 0} stimuli")
    width = max((len(r.rep_id) for r in records), default=0)
    shapes = [f"{r.n_stimuli} x {r.n_neurons}" for r in records]
    across = max((len(shape) for shape in shapes), default=0)
    for r, shape in zip(records, shapes, strict=True):
        click.echo(f"{r.rep_id:<{width}}  {shape:<{across}}  {r.content_hash[:19]}")


@store_group.command("verify")
@click.argument("store", type=click.Path(exists=True, file_okay=False))
@click.option("--no-progress", is_flag=True, help="Do not draw the progress bar.")
def store_verify(store: str, no_progress: bool) -> None:
    """Read every chunk of STORE and check every content hash; exit 1 on damage."""
    from smd_dist.store import ActivationStore

    report = ActivationStore(store, mode="r").verify(progress=not no_progress)
    click.echo(str(report))
    if not report.ok:
        sys.exit(EXIT_FAILED)


@store_group.command("import")
@click.argument("store", type=click.Path(file_okay=False))
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
@click.option("--model", required=True, help="Model name in the store.")
@click.option("--layer", "-l", "layers", multiple=True, metavar="KEY[=NAME]",
              help="Array to import, in order, optionally renamed (repeatable; default: "
                   "all, in the file's order). For a .npy file: its layer name.")
@click.option("--ids", "ids_file", type=click.Path(exists=True, dir_okay=False),
              help="Text file with one stimulus id per line (default: the file's "
                   "'stimulus_ids' entry, if any).")
@click.option("--overwrite", is_flag=True, help="Replace layers that already exist.")
def store_import(store, file, model, layers, ids_file, overwrite) -> None:
    """Import the (stimuli, neurons) arrays of FILE (.npy, .npz, .h5) into STORE."""
    from smd_dist.store import import_arrays

    chosen = None
    if layers:
        if file.lower().endswith(".npy"):
            chosen = list(layers)
        else:
            chosen = dict(
                (key, name or key) for key, _, name in (item.partition("=") for item in layers)
            )
    ids = _read_ids(ids_file) if ids_file else None
    records = import_arrays(store, file, model=model, layers=chosen, stimulus_ids=ids,
                            overwrite=overwrite)
    for rec in records:
        click.echo(f"{rec.rep_id}\t{rec.n_stimuli} x {rec.n_neurons}\t{rec.content_hash[:19]}")


def _read_ids(path: str) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return [line.rstrip("\n") for line in f if line.strip()]


# --- extract / demo (store) ------------------------------------------------------------


def _load_torch_model(spec: str, *, trust_file: bool = False, weights: str | None = None):
    """The model ``--model`` names: ``package.module:factory`` (called with no arguments
    unless it is a module already), with ``--weights`` loaded into it; or a file saved
    with ``torch.save(model)`` / ``torch.jit.save``, only with ``--trust-model-file``.

    A pickled module runs arbitrary code from the file as it loads, and a TorchScript
    archive is a program: a model file is loaded only when the user says it is trusted.
    ``--weights`` files are read with ``torch.load(weights_only=True)``, which builds
    tensors and containers only and runs no code from the file.
    """
    import importlib
    import os
    import warnings
    import zipfile

    import torch

    if os.path.isfile(spec):
        if weights is not None:
            raise click.BadParameter(
                "--weights goes with --model package.module:factory, not with a model file",
                param_hint="--weights",
            )
        if not trust_file:
            raise click.BadParameter(
                f"{spec!r} is a model file: loading a pickled module or a TorchScript program "
                "runs code from the file, so smd-dist loads one only with --trust-model-file "
                "(for files you made, or whose source you trust). Otherwise give the "
                "architecture as package.module:factory and the file's state dict as "
                "--weights FILE (torch.load(weights_only=True): no code runs)",
                param_hint="--model",
            )
        if zipfile.is_zipfile(spec) and any(
            name.endswith("constants.pkl") for name in zipfile.ZipFile(spec).namelist()
        ):
            with warnings.catch_warnings():  # TorchScript is deprecated but still loads
                warnings.simplefilter("ignore", DeprecationWarning)
                return torch.jit.load(spec, map_location="cpu")
        model = torch.load(spec, map_location="cpu", weights_only=False)
    else:
        if ":" not in spec:
            raise click.BadParameter(
                f"{spec!r} is neither a file nor 'package.module:factory'", param_hint="--model"
            )
        module_name, _, attr = spec.partition(":")
        try:
            obj = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as err:
            raise click.BadParameter(f"cannot load {spec!r}: {err}", param_hint="--model") from err
        model = obj if isinstance(obj, torch.nn.Module) else obj()
    if not isinstance(model, torch.nn.Module):
        raise click.BadParameter(
            f"{spec!r} gave a {type(model).__name__}, not a torch.nn.Module", param_hint="--model"
        )
    if weights is not None:
        try:
            state = torch.load(weights, map_location="cpu", weights_only=True)
            model.load_state_dict(state)
        except Exception as err:  # unpickling refused, missing or unexpected keys, shapes
            raise click.BadParameter(
                f"cannot load the state dict {weights!r} into {spec!r}: {err}",
                param_hint="--weights",
            ) from err
    return model


@main.command("extract")
@click.argument("store", required=False, type=click.Path())
@click.option("--model", "model_spec", required=True,
              help="package.module:factory, or a file from torch.save / torch.jit.save "
                   "(with --trust-model-file).")
@click.option("--weights", type=click.Path(exists=True, dir_okay=False),
              help="A state dict (torch.save(model.state_dict())) to load into the factory's "
                   "model; read with torch.load(weights_only=True), which runs no code.")
@click.option("--trust-model-file", is_flag=True,
              help="Load a --model file, which runs code from it (a pickled module or a "
                   "TorchScript program): only for files you made or trust.")
@click.option("--inputs", type=click.Path(exists=True, dir_okay=False),
              help="A .npy array of stimuli, first axis = stimuli.")
@click.option("--layer", "-l", "layers", multiple=True, metavar="[NAME=]MODULE",
              help="Module path as in model.named_modules(), stored as NAME if given "
                   "(repeat, or comma-separate).")
@click.option("--name", "model_name", help="Model name in the store.")
@click.option("--pooling", type=click.Choice(["flatten", "mean"]), default="flatten",
              show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--device", default=None, help="cpu, cuda, cuda:1 ... (default: leave the model)")
@click.option("--ids", "ids_file", type=click.Path(exists=True, dir_okay=False),
              help="Text file with one stimulus id per line.")
@click.option("--overwrite", is_flag=True, help="Replace reps that already exist.")
@click.option("--list-layers", is_flag=True, help="Print the model's module paths and exit.")
def extract_command(store, model_spec, weights, trust_model_file, inputs, layers, model_name,
                    pooling, batch_size, device, ids_file, overwrite, list_layers):
    """Extract activations of a torch model's layers on a .npy stimulus array into STORE."""
    import numpy as np

    from smd_dist.store import ActivationStore, StoreError
    from smd_dist.store.extraction import ExtractionError, extract

    model = _load_torch_model(model_spec, trust_file=trust_model_file, weights=weights)
    if list_layers:
        for name, module in model.named_modules():
            if name:
                click.echo(f"{name}\t{type(module).__name__}")
        return
    missing = [opt for opt, val in (("STORE", store), ("--inputs", inputs), ("--layer", layers),
                                    ("--name", model_name)) if not val]
    if missing:
        raise click.UsageError(f"missing {', '.join(missing)}")
    layer_names = {}  # module path -> stored layer name, as extract() takes them
    for part in (p.strip() for item in layers for p in item.split(",")):
        name, named, module = (x.strip() for x in part.partition("="))
        module = module if named else name
        if part and layer_names.setdefault(module, name) != name:
            raise click.BadParameter(f"module {module!r} named twice", param_hint="--layer")
    x = np.load(inputs, mmap_mode="r")
    ids = None
    if ids_file:
        with open(ids_file, encoding="utf-8") as f:
            ids = [line.rstrip("\n") for line in f if line.strip()]
        if len(ids) != len(x):
            raise click.UsageError(f"{ids_file} has {len(ids)} ids, {inputs} has {len(x)} stimuli")
    batches = [
        np.array(x[i : i + batch_size], dtype=np.float32) for i in range(0, len(x), batch_size)
    ]
    try:
        records = extract(model, batches, layers=layer_names, store=ActivationStore(store),
                          model_name=model_name, pooling=pooling, device=device,
                          stimulus_ids=ids, overwrite=overwrite)
    except (StoreError, ExtractionError) as err:
        raise click.ClickException(str(err)) from err
    for rec in records:
        click.echo(f"{rec.rep_id}\t{rec.n_stimuli} x {rec.n_neurons}\t{rec.content_hash[:19]}")


@main.group("demo")
def demo_group() -> None:
    """The offline demo stores (digits CNNs and MiniLM-L6)."""


@demo_group.command("build")
@click.argument("path", type=click.Path(file_okay=False))
@click.option("--small", is_flag=True, help="Reduced build for tests (seconds, not minutes).")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars.")
@click.option("--force", is_flag=True, help="Replace demo stores already in PATH.")
def demo_build_command(path, small, quiet, force):
    """Build PATH/digits and PATH/minilm, two activation stores, offline and seeded."""
    from smd_dist.demo import build_demo
    from smd_dist.store import StoreError

    try:
        result = build_demo(path, small=small, progress=not quiet, log=click.echo,
                            force=force)
    except StoreError as err:
        raise click.ClickException(str(err)) from err
    click.echo(
        f"built in {result.seconds:.0f} s: {result.digits} ({result.n_reps['digits']} reps), "
        f"{result.minilm} ({result.n_reps['minilm']} reps)"
    )


# --- plot (analysis) -------------------------------------------------------------------


@main.command("plot")
@click.argument("results", type=click.Path(exists=True))
@click.argument("outdir", type=click.Path(file_okay=False))
@click.option(
    "--metric", default=None, help="Metric variable (default: the only one, else soft_matching)."
)
@click.option(
    "--kind",
    "kinds",
    multiple=True,
    type=click.Choice(["heatmap", "mds", "dendrogram"]),
    help="Figures to draw (repeatable; default all three).",
)
@click.option("--reps", multiple=True, help="Glob on 'model/layer' (repeatable).")
@click.option("--models", multiple=True, help="Glob on the model name (repeatable).")
@click.option("--layers", multiple=True, help="Glob on the layer name (repeatable).")
@click.option(
    "--mds",
    "mds_method",
    type=click.Choice(["metric", "classical"]),
    default="metric",
    show_default=True,
)
@click.option("--mds-labels", type=click.Choice(["auto", "all", "ends", "none"]), default="auto",
              show_default=True,
              help="Layers named on the MDS plot (auto: all up to 40 points, else the ends).")
@click.option("--linkage", default="average", show_default=True, help="scipy linkage method.")
@click.option(
    "--format", "fmt", type=click.Choice(["png", "svg", "pdf"]), default="png", show_default=True
)
@click.option("--dpi", type=int, default=150, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True, help="Metric MDS seed.")
def plot(
    results, outdir, metric, kinds, reps, models, layers, mds_method, mds_labels, linkage, fmt,
    dpi, seed
) -> None:
    """Draw a heatmap, an MDS scatter and a dendrogram of a results store into OUTDIR
    (the heatmap only, by default, for a run with against: a rectangle)."""
    from pathlib import Path

    from smd_dist import analysis
    from smd_dist.engine.output import open_distances

    try:
        ds = open_distances(results)
        ds = analysis.select(ds, reps or None, models=models or None, layers=layers or None)
        rectangle = list(ds.rep_a.values) != list(ds.rep_b.values)
        if rectangle:  # a run with against: only the heatmap draws a rectangle
            name = str(analysis.best_matches(ds, metric).attrs["metric"])
        else:
            name = str(analysis.dissimilarity(ds, metric).name)
        out = Path(outdir)
        written = []
        for kind in kinds or (("heatmap",) if rectangle else ("heatmap", "mds", "dendrogram")):
            path = out / f"{name}_{kind}.{fmt}"
            if kind == "heatmap":
                analysis.plot_heatmap(ds, path, metric=name, dpi=dpi)
            elif kind == "mds":
                if mds_method == "metric":
                    emb = analysis.metric_mds(ds, metric=name, random_state=seed)
                else:
                    emb = analysis.classical_mds(ds, metric=name)
                analysis.plot_mds(emb, path, dpi=dpi, annotate=mds_labels)
            else:
                analysis.plot_dendrogram(
                    analysis.cluster(ds, metric=name, method=linkage), path, dpi=dpi
                )
            written.append(path)
    except ValueError as err:
        raise click.ClickException(str(err)) from err
    for path in written:
        click.echo(str(path))


# --- cluster (slurm) -------------------------------------------------------------------
@main.group("cluster")
def cluster_group() -> None:
    """The Dask cluster a run config describes (local, address or SLURM)."""


@cluster_group.command("job-script")
@click.argument("config_path", metavar="CONFIG", type=click.Path(dir_okay=False))
def cluster_job_script(config_path: str) -> None:
    """Print the SLURM batch script that the run CONFIG (YAML) would submit per job.

    Needs no SLURM: the scheduler's address, known only at run time, is a placeholder.
    Exits 2 on a bad config or a cluster kind other than slurm.
    """
    from smd_dist.engine.clusters import job_script, read_cluster_section

    click.echo(job_script(read_cluster_section(config_path)), nl=False)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
