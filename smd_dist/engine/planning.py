"""Planning a run's work: memory per pair and the grouping of pairs into tasks."""

from __future__ import annotations

__all__ = ["pair_memory_bytes", "plan_tasks"]


def pair_memory_bytes(n_stimuli: int, n_a: int, n_b: int) -> int:
    """Peak bytes one pair task needs, with margin.

    Two prepared float64 inputs and their float32 copies, the float32 cross product,
    and — on the network-simplex path — a float64 cost matrix, plan and reduced costs.
    """
    return int(12 * n_stimuli * (n_a + n_b) + 28 * n_a * n_b)


def plan_tasks(
    reps: list, todo: list[tuple[int, int]], *, task_entries: int, per_task: int
) -> list:
    """Group pairs into tasks of about ``task_entries`` cost entries; largest work first.

    A pair of at least ``task_entries`` entries (``Nx·Ny``) is a task of its own; smaller
    pairs are batched, in tiles of reps (neighbouring pairs share inputs), until a batch
    holds ``task_entries`` entries or ``per_task`` pairs: each task carries a fixed cost in
    the scheduler, the client and the worker's event loop, which small pairs would not
    repay. Tasks are ordered by their work, ``Σ Nx·Ny``, largest first (stable, so tiles
    stay together among equals): a wide pair submitted last would leave every other
    worker idle while it runs.
    """
    tile = 8
    todo = sorted(todo, key=lambda ij: (ij[0] // tile, ij[1] // tile, ij[0], ij[1]))
    tasks, batch, entries = [], [], 0
    for i, j in todo:
        work = reps[i].n_neurons * reps[j].n_neurons
        if work >= task_entries:
            tasks.append([(i, j)])
            continue
        batch.append((i, j))
        entries += work
        if entries >= task_entries or len(batch) >= per_task:
            tasks.append(batch)
            batch, entries = [], 0
    if batch:
        tasks.append(batch)
    tasks.sort(key=lambda task: -sum(reps[i].n_neurons * reps[j].n_neurons for i, j in task))
    return tasks
