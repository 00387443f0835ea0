"""Deprecated aliases for the module paths of the flat layout before 0.2.

``import smd_dist.solvers`` still works and gives :mod:`smd_dist.kernel.transport` itself (the
same module object, so patching either patches both), with a ``DeprecationWarning`` that
names the new path. Nothing here is imported by smd-dist's own code.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings


class _MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def __init__(self, moved: dict[str, str]):
        self.moved = moved

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in self.moved:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec):
        new = self.moved[spec.name]
        warnings.warn(
            f"{spec.name} moved to {new} in smd-dist 0.2; import it from there "
            "(the old path will be removed)",
            DeprecationWarning,
            stacklevel=2,
        )
        return importlib.import_module(new)

    def exec_module(self, module) -> None:
        """Nothing to run: the module is the one at its new path, already imported."""


def install(moved: dict[str, str]) -> None:
    """Serve the old module paths in ``moved`` (old -> new) from their new homes."""
    if not any(isinstance(f, _MovedModules) for f in sys.meta_path):
        sys.meta_path.append(_MovedModules(moved))
