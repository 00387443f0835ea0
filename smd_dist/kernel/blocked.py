"""Cost bounds for wide pairs: built one block of the product at a time, kept in 16 bits.

Arrays are (stimuli M, neurons N): a neuron's tuning curve is a column. At LLM widths
(8192 to 32768 neurons) the float32 bound matrix of
:class:`~smd_dist.kernel.bounds.CostBounds` takes :math:`4 N_x N_y` bytes (4 GiB at
32768²), and building it and pricing every round are passes over all of it. Here each block
of rows of the low-precision product :math:`X^\\top Y` becomes bounds while it is in
cache, stored as 16-bit multiples of a power of two :math:`q`, rounded down:

.. math::

    K_{ij} = \\lfloor L_{ij} / q \\rfloor, \\qquad q K_{ij} \\le L_{ij} \\le D_{ij},

with :math:`L_{ij}` the bound of :mod:`smd_dist.kernel.bounds` (same error terms, same
float32 evaluation slack; dividing by a power of two and taking the floor are exact).
:math:`q` is 0.6 to 1.3 :math:`\\cdot 10^{-4}` of the cost scale, against the bfloat16
product's :math:`2 \\cdot 10^{-3}`: the bound barely loosens, and takes 2 bytes an entry.

The same pass collects the first candidate set of the sparse solver: the :math:`k`
smallest bounds of every row and of every column. Rows alone are not enough: a column that
is every row's second choice gets no entry and its dual is set by the rest of the plan,
which leaves most of its column violated (measured at 4096², M = 2000, shared latent:
round-one violations fell from 61 per row with the global threshold of
:meth:`CostBounds.candidates` to about 1 per row).

Pricing (:meth:`BlockedBounds.below`) reads the codes a block of rows at a time, can be
limited to a sub-matrix (the rows and columns whose duals moved, see
:mod:`smd_dist.kernel.sparse`), and over its budget keeps the most doubtful entries of each
row in the same single pass.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from smd_dist.kernel.bounds import (
    CostBounds,
    LowPrecision,
    bound_terms,
    refuse_reduced_precision,
)

__all__ = ["BLOCKED_MIN_ENTRIES", "CANDIDATES", "BlockedBounds"]

#: Pairs with at least this many entries (after merging identical neurons) get blocked
#: bounds in :func:`smd_dist.kernel.transport.solve`; smaller ones the float32 matrix.
#: Measured on one core, M = 2000, the whole solve against the float32 matrix's: 9 % less
#: time at 2048² on a shared latent, 17 % with redundant and dead neurons (1843 x 1828
#: after merging), 34 % and 41 % at 4096².
BLOCKED_MIN_ENTRIES = 2048 * 2048
#: Smallest bounds kept per row and per column (times the width ratio where the other
#: side is wider) as the first candidate set. Measured at 16384², M = 2000, one core: 12
#: against 8 took 10 % less time with redundant and dead neurons (4 rounds against 5) and
#: 2 % more on a shared latent (more exact entries, the same 3 rounds).
CANDIDATES = 12
#: The codes span ``[-2**15, 2**15)``; the bounds span ``[-0.1, 2.05]`` times the cost
#: scale (``L <= (|x| + |y|)²`` inflated by the product's error), so this covers them.
_SPAN = 2.1 / (2**15 - 1)
#: Rows of the product per GEMM call (a bfloat16 block of 512 × 16384 is 16 MiB), and
#: entries per float32 chunk turned into bounds at once (16 MiB). Chunks and pricing blocks
#: are large so that a pass makes few calls into threaded kernels: on an oversubscribed
#: machine each call waits for both threads (measured at 8192², two threads on a shared
#: VM: 28 s with 1 MiB blocks, 17 s with these), at 3 % more time on one quiet thread.
_GEMM_ROWS = 512
_CHUNK_ELEMENTS = 1 << 22
#: Widest row segment and tallest row group whose minimum stands for it in the search for
#: each row's and column's smallest bounds.
_SEGMENT = 64
_GROUP = 32
#: Entries per block when pricing (4 MiB of codes, 8 MiB as float32).
_PRICE_ELEMENTS = 1 << 21
#: Columns sampled per row for its cut when a round is over budget.
_CUT_SAMPLE = 2048


class BlockedBounds(CostBounds):
    """Lower bounds on all squared distances, as 16-bit codes, and exact costs on request.

    Parameters
    ----------
    X, Y : numpy.ndarray, shapes (M, Nx) and (M, Ny), float64
        Prepared activations (stimuli in rows, neurons in columns), finite.
    sq_norms : tuple of numpy.ndarray
        ``(||x_i||², ||y_j||²)`` in float64.
    device : torch.device
        Where the product, the codes and the pricing live.
    low : tuple of LowPrecision
        :func:`~smd_dist.kernel.bounds.low_precision` copies of X and Y (their precision
        is the product's).
    k : int
        Candidates kept per row and per column (:meth:`candidates`).

    Attributes
    ----------
    codes : torch.Tensor, shape (Nx, Ny), int16
        ``quantum * codes[i, j] <= D_ij``.
    quantum : float
        A power of two.
    dtype, scale :
        As :class:`~smd_dist.kernel.bounds.CostBounds`.

    Raises
    ------
    ReducedPrecision
        As :class:`~smd_dist.kernel.bounds.CostBounds`.
    """

    def __init__(
        self,
        X: np.ndarray,
        Y: np.ndarray,
        sq_norms,
        *,
        device: torch.device,
        low: tuple[LowPrecision, LowPrecision],
        k: int = CANDIDATES,
    ):
        refuse_reduced_precision(device)
        self.nx, self.ny = sq_norms
        self.dtype = low[0].low.dtype
        terms = bound_terms(low, sq_norms, X.shape[0])
        self.scale = terms.scale
        self._abs_bound = 3.0 * terms.scale
        self.quantum = q = 2.0 ** math.ceil(math.log2(max(_SPAN * terms.scale, 2.0**-1000)))
        self._X, self._Y = X, Y
        self._XT = self._YT = None
        self.codes, self._candidates = _build(low, terms, q, device, k)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)

    def candidates(self, k: int | None = None) -> np.ndarray:
        """Sorted keys of the ``k`` smallest bounds of every row and of every column.

        Collected while the bounds were built, with the ``k`` given then (times the width
        ratio where the other side is wider); the argument is accepted for the interface
        of :meth:`CostBounds.candidates` and ignored.
        """
        return self._candidates

    def lower_at(self, keys: np.ndarray) -> np.ndarray:
        """The lower bounds (float64) of the entries ``keys``."""
        index = torch.from_numpy(keys).to(self.codes.device)
        return self.codes.ravel()[index].double().cpu().numpy() * self.quantum

    def below(
        self,
        u: np.ndarray,
        v: np.ndarray,
        *,
        budget=None,
        per_row: int = 32,
        cushion=0.0,
        rows: np.ndarray | None = None,
        cols: np.ndarray | None = None,
    ):
        """Sorted keys of the entries whose bound does not prove ``D_ij - u_i - v_j >= 0``.

        As :meth:`CostBounds.below`, over the sub-matrix ``rows × cols`` (sorted int64
        indices; all when None), in one pass: a block of rows with more doubtful entries
        than its share of ``budget`` keeps only about the ``per_row`` most doubtful of each
        of its rows, and the answer is then incomplete.

        Returns
        -------
        keys : numpy.ndarray of int64
        complete : bool
            False when the budget left entries out (nothing is proven about those).
        """
        q = self.quantum
        margin = self.pricing_margin(u, v, cushion)
        dev = self.codes.device
        # In units of the quantum (a power of two, so the scaling is exact): the codes are
        # read as they are, and a hit is K_ij - v_j < threshold + u_i.
        edge = torch.from_numpy(((u + margin) / q).astype(np.float32)).to(dev)
        vq = torch.from_numpy((v / q).astype(np.float32)).to(dev)
        col_index = None if cols is None else torch.from_numpy(cols).to(dev)
        if col_index is not None:
            vq = vq[col_index]
        nx, ny = self.shape
        width = ny if cols is None else cols.size
        n_rows = nx if rows is None else rows.size
        step = max(1, _PRICE_ELEMENTS // max(width, 1))
        # Fresh block-sized buffers would be page-faulted in on every block (glibc maps
        # them afresh): reusing two halves the cost of a pass.
        buf = torch.empty((min(step, n_rows), width), device=dev)
        hits = torch.empty((min(step, n_rows), width), dtype=torch.bool, device=dev)
        found, complete = [], True
        for s in range(0, n_rows, step):
            if rows is None:
                ids = np.arange(s, min(s + step, nx), dtype=np.int64)
                block = self.codes[s : s + step]
                e = edge[s : s + step]
            else:
                ids = rows[s : s + step]
                index = torch.from_numpy(ids).to(dev)
                block = self.codes[index]
                e = edge[index]
            if col_index is not None:
                block = block[:, col_index]
            R = buf[: ids.size]
            torch.sub(block, vq, out=R)
            torch.lt(R, e[:, None], out=hits[: ids.size])
            keys = self._keys_in(hits[: ids.size], ids, cols)
            if budget is not None and keys.size > budget * ids.size / n_rows:
                complete = False
                keys = self._keys_in(R < _row_cuts(R, e, per_row)[:, None], ids, cols)
            found.append(keys)
        return (np.concatenate(found) if found else np.empty(0, np.int64)), complete

    def _keys_in(self, hits: torch.Tensor, ids: np.ndarray, cols) -> np.ndarray:
        """Keys ``i*Ny + j`` of a block's hits (block rows ``ids``, columns ``cols``)."""
        if hits.device.type == "cpu":  # NumPy's nonzero was measured 2-4x faster than torch's
            hit = np.flatnonzero(hits.numpy())
        else:
            hit = torch.nonzero(hits.ravel()).ravel().cpu().numpy()
        width = hits.shape[1]
        r, c = np.divmod(hit.astype(np.int64), width)
        return ids[r] * np.int64(self.shape[1]) + (c if cols is None else cols[c])


def _row_cuts(R: torch.Tensor, edge: torch.Tensor, per_row: int) -> torch.Tensor:
    """Per row, about the ``per_row``-th smallest of ``R`` (read off a sample of its
    columns), never above ``edge``."""
    width = R.shape[1]
    sub = R[:, :: max(1, width // _CUT_SAMPLE)]
    q = max(1, round(per_row * sub.shape[1] / width))
    if q >= sub.shape[1]:
        return edge
    return torch.minimum(torch.kthvalue(sub, q, dim=1).values, edge)


def _build(low, terms, q: float, device: torch.device, k: int):
    """The codes and first candidates, from the product one block of rows at a time."""
    Xl, Yl = low[0].low.to(device), low[1].low.to(device)
    nx, ny = Xl.shape[0], Yl.shape[0]
    left, right = terms.factors(device, unit=q)
    beta = terms.beta / q  # powers of two: the bound comes out counted in quanta, exactly
    k_row = min(ny, k * max(1, round(ny / nx)))
    k_col = min(nx, k * max(1, round(nx / ny)))
    # Segments of a row and groups of rows whose minima stand for them: a row's k
    # smallest segment minima (and a column's k smallest group minima) hold its k
    # smallest entries unless two fall in one segment; min-reductions without indices are
    # ten times cheaper than a top-k.
    seg = _pow2_at_most(max(1, ny // (4 * k_row)), _SEGMENT)
    grp = _pow2_at_most(max(1, nx // (4 * k_col)), _GROUP)
    width = -(-ny // seg) * seg
    chunk = max(grp, _CHUNK_ELEMENTS // width // grp * grp)
    buf = torch.full((chunk, width), math.inf, device=device)
    gemm_rows = max(_GEMM_ROWS // chunk, 1) * chunk
    product = torch.empty((min(gemm_rows, nx), ny), dtype=Xl.dtype, device=device)
    # torch's allocation, not NumPy's: huge pages fresh from this VM's balloon cost more
    # than the faults they save (0.63 s against 0.23 s for the codes at 16384²).
    codes = torch.empty((nx, ny), dtype=torch.int16, device=device)
    group_min = torch.empty((-(-nx // grp), ny), dtype=torch.int16, device=device)
    row_keys = []
    for s in range(0, nx, gemm_rows):
        g = product[: min(gemm_rows, nx - s)]
        torch.matmul(Xl[s : s + gemm_rows], Yl.T, out=g)
        for t in range(0, g.shape[0], chunk):
            first = s + t
            f = buf[: min(chunk, g.shape[0] - t), :ny]
            f.copy_(g[t : t + chunk])
            if terms.r:
                f.add_(f.abs(), alpha=terms.r)
            f.addmm_(left[first : first + f.shape[0]], right, beta=beta)
            rows = -(-f.shape[0] // grp) * grp
            if rows > f.shape[0]:  # the last block: its missing rows count as +inf
                buf[f.shape[0] : rows] = math.inf
            row_keys.append(_row_candidates(buf[: f.shape[0]], seg, k_row, first, ny))
            # Rounded down, and clamped to the code range: from above a rounding down, from
            # below never reached (the bound is above -0.1 scale, the range -2.1 scale).
            buf[:rows].floor_().clamp_(-(2**15), 2**15 - 1)
            codes[first : first + f.shape[0]] = f
            group_min[first // grp : (first + rows) // grp] = (
                buf[:rows, :ny].view(rows // grp, grp, ny).amin(1)
            )
    keys = torch.cat([*row_keys, _column_candidates(codes, group_min, grp, k_col)])
    return codes, np.unique(keys.cpu().numpy())


def _pow2_at_most(n: int, cap: int) -> int:
    return min(cap, 1 << (n.bit_length() - 1))


def _row_candidates(f: torch.Tensor, seg: int, k: int, first: int, ny: int) -> torch.Tensor:
    """Keys of the entries of rows ``f`` (padded with +inf to whole segments) at or below
    the ``k``-th smallest of their segment minima: at least ``k`` per row."""
    b = f.shape[0]
    segments = f.view(b, -1, seg)
    minima = segments.amin(2)
    cut = torch.topk(minima, k, dim=1, largest=False).values[:, -1]
    r, s = torch.nonzero(minima <= cut[:, None], as_tuple=True)
    p, w = torch.nonzero(segments[r, s] <= cut[r, None], as_tuple=True)
    return (first + r[p]) * ny + s[p] * seg + w


def _column_candidates(codes, group_min, grp: int, k: int) -> torch.Tensor:
    """Keys of the entries at or below the ``k``-th smallest group minimum of their column
    (read from the codes, in the groups holding such a minimum): at least ``k`` per column."""
    nx, ny = codes.shape
    step = max(1, _CHUNK_ELEMENTS // group_min.shape[0])  # a float32 copy of a few MiB
    cut = torch.cat([
        torch.topk(group_min[:, c : c + step].T.to(torch.float32), k, dim=1, largest=False)
        .values[:, -1]
        for c in range(0, ny, step)
    ])
    gi, j = torch.nonzero(group_min <= cut[None, :], as_tuple=True)
    rows = gi[:, None] * grp + torch.arange(grp, device=codes.device)[None, :]
    inside = rows < nx
    rows = rows.clamp_(max=nx - 1)
    hit = (codes[rows, j[:, None]] <= cut[j, None]) & inside
    p, w = torch.nonzero(hit, as_tuple=True)
    return rows[p, w] * ny + j[p]
