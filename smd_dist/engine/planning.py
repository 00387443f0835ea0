"""Planning a run's work: memory per pair, and blocks of the matrix as tasks."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = ["Block", "pair_memory_bytes", "plan_blocks"]


def pair_memory_bytes(n_stimuli, n_a, n_b):
    """Peak bytes one pair task needs (elementwise over arrays): the kernel's own estimate
    for the path it takes first (:func:`smd_dist.kernel.transport.memory_bytes`)."""
    from smd_dist.kernel.transport import memory_bytes  # torch and POT, only when planning

    return memory_bytes(n_stimuli, n_a, n_b)


@dataclass(frozen=True, eq=False)
class Block:
    """The pairs of one task: ``a[k]`` against ``b[k]``, indices into the run's reps.

    ``work`` is their cost entries, ``Σ N_a·N_b``. A block's pairs come from a tile of the
    matrix (a band of rows against a band of columns), so they share few reps.
    """

    a: np.ndarray
    b: np.ndarray
    work: int

    def __len__(self) -> int:
        return int(self.a.size)

    @property
    def reps(self) -> np.ndarray:
        """The reps its pairs use, each once, ascending."""
        return np.union1d(self.a, self.b)


def plan_blocks(
    widths,
    a,
    b,
    *,
    task_entries: int,
    max_pairs: int,
    min_tasks: int = 1,
) -> list[Block]:
    """Group the pairs ``(a[k], b[k])`` into blocks of at most ``task_entries`` cost entries
    and ``max_pairs`` pairs; largest work first.

    A pair of ``task_entries`` entries or more is a block of its own. The others are
    taken by tiles: the reps (in matrix order) are cut into bands of about
    ``√task_entries`` neurons and ``√max_pairs`` reps, so that a band against a band is
    about one block, and whole tiles are put together into blocks (a tile too big for one
    is cut). Each task carries a fixed cost in the scheduler, the client and the worker's
    event loop that small pairs would not repay one by one, and a block of a few bands
    reads and keeps few reps. With ``min_tasks``, blocks are made smaller if needed so
    that there are at least that many (while there are pairs): every worker thread gets
    work. Blocks are ordered by their work, largest first (stable), so no wide pair runs
    alone at the end.

    Parameters
    ----------
    widths : array_like of int
        Neurons of each rep (``N``), in matrix order.
    a, b : array_like of int
        The pairs, indices into ``widths``; each block keeps them as given.
    task_entries : int
        Cost entries per block (0: one pair per block).
    max_pairs : int
        Most pairs per block.
    min_tasks : int
        Fewest blocks wanted.
    """
    widths = np.asarray(widths, dtype=np.int64)
    a, b = np.asarray(a, dtype=np.int32), np.asarray(b, dtype=np.int32)
    if not a.size:
        return []
    work = widths[a] * widths[b]
    target, max_pairs = int(task_entries), max(int(max_pairs), 1)
    if min_tasks > 1:
        target = min(target, max(int(work.sum()) // int(min_tasks), 1))
        max_pairs = min(max_pairs, max(-(-a.size // int(min_tasks)), 1))
    if target <= 0:
        max_pairs = 1
    alone = work >= max(target, 1)
    blocks = [Block(a[k : k + 1], b[k : k + 1], int(work[k])) for k in np.flatnonzero(alone)]
    a, b, work = a[~alone], b[~alone], work[~alone]
    band = _bands(widths, math.isqrt(max(target, 1)), math.isqrt(max_pairs))
    lo, hi = np.minimum(band[a], band[b]), np.maximum(band[a], band[b])
    order = np.lexsort((b, a, hi, lo))
    a, b, work, lo, hi = a[order], b[order], work[order], lo[order], hi[order]
    before = np.concatenate([[0], np.cumsum(work)])  # work of the pairs before each
    tiles = np.flatnonzero((np.diff(lo) != 0) | (np.diff(hi) != 0)) + 1
    start = 0
    for tile_start, tile_stop in zip(
        [0, *tiles.tolist()], [*tiles.tolist(), a.size], strict=True
    ):
        # Close the open block where this whole tile would not fit in it.
        if tile_start > start and (
            before[tile_stop] - before[start] > target or tile_stop - start > max_pairs
        ):
            blocks.append(_block(a, b, before, start, tile_start))
            start = tile_start
        # A tile too big for one block is cut; its last piece stays open.
        while before[tile_stop] - before[start] > target or tile_stop - start > max_pairs:
            stop = int(np.searchsorted(before, before[start] + target, side="right")) - 1
            stop = min(max(stop, start + 1), start + max_pairs)
            blocks.append(_block(a, b, before, start, stop))
            start = stop
    if start < a.size:
        blocks.append(_block(a, b, before, start, a.size))
    blocks.sort(key=lambda block: -block.work)
    return blocks


def _block(a, b, before, start: int, stop: int) -> Block:
    return Block(a[start:stop], b[start:stop], int(before[stop] - before[start]))


def _bands(widths: np.ndarray, neurons: int, reps: int) -> np.ndarray:
    """Band number of each rep: consecutive reps of about ``neurons`` neurons and at most
    ``reps`` reps in all; a rep wider than ``neurons`` is a band of its own."""
    band = np.empty(widths.size, dtype=np.int64)
    current, filled, count = 0, 0, 0
    for k, width in enumerate(widths.tolist()):
        if count and (filled + width > neurons or count >= reps):
            current, filled, count = current + 1, 0, 0
        band[k] = current
        filled += width
        count += 1
    return band
