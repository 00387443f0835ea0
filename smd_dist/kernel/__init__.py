"""The exact kernel: one pair of representations in, a certified number out.

Arrays are (stimuli, neurons): a neuron's tuning curve is a column. The modules, in the
order data flows through them:

``validation``
    Input checks, one place.
``preparation``, ``allocator``
    Centring and normalising tuning curves (torch for the cross product), on small pages.
``prepared``
    :class:`PreparedRep`: a representation prepared once, with its norms, identical-column
    groups and low-precision copy.
``bounds``
    Rigorous lower bounds on every cost from one low-precision product.
``certificate``
    The optimality certificate every solve must pass.
``dense``, ``sparse``
    Exact solvers on the float64 cost matrix, and on a sparse candidate set priced by the
    bounds.
``transport``
    :func:`solve`: which method for which pair, merging identical neurons; the
    :class:`Transport` it returns.
``sinkhorn``
    The fast mode: entropic transport turned into a certified interval on the exact cost
    (a feasible dual from below, a rounded feasible plan from above).

Nothing here knows of Dask, zarr, the CLI or configuration.
"""

from smd_dist.kernel.certificate import Certificate, SolverError
from smd_dist.kernel.prepared import PreparedRep, prepare, prepare_pair
from smd_dist.kernel.transport import Transport, solve

__all__ = [
    "Certificate",
    "PreparedRep",
    "SolverError",
    "Transport",
    "prepare",
    "prepare_pair",
    "solve",
]
