"""The package's shape: which layer may import which, and a light ``import smd_dist``."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "smd_dist"
LAYERS = ("kernel", "metrics", "store", "engine", "analysis", "demo")
TOP = ("cli", "config", "__main__")
#: layer -> what it must never import (data flows store -> kernel -> engine -> analysis).
FORBIDDEN = {
    "kernel": {"metrics", "store", "engine", "analysis", "demo", *TOP},
    "metrics": {"store", "engine", "analysis", "demo", *TOP},
    "store": {"metrics", "engine", "analysis", "demo", *TOP},
    "engine": {"analysis", "demo", "cli", "__main__"},
    "analysis": {"engine", "store", "demo", *TOP},
    "demo": {"engine", "analysis", *TOP},
}
HEAVY = ("torch", "dask", "distributed", "zarr", "xarray", "ot")


def _smd_imports(path: Path) -> set[str]:
    """First component under ``smd_dist`` of every import in a module, at any depth."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            parts = name.split(".")
            if parts[0] == "smd_dist" and len(parts) > 1:
                found.add(parts[1])
    return found


@pytest.mark.parametrize("layer", LAYERS)
def test_no_layer_reaches_back_up(layer):
    offenders = {
        str(path.relative_to(PACKAGE)): sorted(_smd_imports(path) & FORBIDDEN[layer])
        for path in (PACKAGE / layer).rglob("*.py")
    }
    assert not {k: v for k, v in offenders.items() if v}, offenders


def test_the_layers_are_the_only_subpackages():
    folders = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists()}
    assert folders == set(LAYERS)
    modules = {p.stem for p in PACKAGE.glob("*.py")}
    assert modules == {"__init__", "__main__", "_moved", "cli", "config"}


def _loaded_after(code: str) -> list[str]:
    probe = (
        f"{code}\nimport json, sys\n"
        f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_import_smd_dist_loads_no_heavy_library():
    assert _loaded_after("import smd_dist; smd_dist.__version__; dir(smd_dist)") == []


def test_cli_help_loads_no_heavy_library():
    code = (
        "import contextlib, io\nfrom smd_dist.cli import main\n"
        "with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()):\n"
        "    main(['--help'])"
    )
    assert _loaded_after(code) == []


def test_public_names_load_on_first_use():
    assert "torch" in _loaded_after("import smd_dist; smd_dist.soft_matching_distance")
    import smd_dist

    for name in smd_dist.__all__:
        assert getattr(smd_dist, name) is not None, name
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        smd_dist.nope  # noqa: B018


def test_layers_are_attributes_of_the_package_imported_on_first_use():
    probe = "import smd_dist; smd_dist.analysis.best_matches; smd_dist.engine.compute_distances"
    assert "xarray" in _loaded_after(probe)
    import smd_dist

    assert smd_dist.analysis is sys.modules["smd_dist.analysis"]
    assert {"analysis", "kernel", "store"} <= set(dir(smd_dist))


def test_old_module_paths_still_import_with_a_deprecation_warning():
    import smd_dist.kernel.transport as new

    sys.modules.pop("smd_dist.solvers", None)
    with pytest.warns(DeprecationWarning, match="smd_dist.solvers moved to smd_dist.kernel"):
        import smd_dist.solvers as old
    assert old is new and old.solve is new.solve
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from smd_dist.cluster import make_client
    from smd_dist.engine.clusters import make_client as moved

    assert make_client is moved
