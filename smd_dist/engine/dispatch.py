"""Sending a run's blocks to Dask and writing what comes back to the ledger.

Blocks (:mod:`~smd_dist.engine.planning`) are submitted in waves, a bounded number in
flight, so that 10⁶ pairs never make one giant graph; each returns arrays over its pairs
(:class:`~smd_dist.engine.tasks.BlockResult`), which are buffered as columns and appended
to the output as one ledger part at least every ``flush-seconds`` (and when the run
ends, however it ends). Nothing here makes a Python object per pair.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence

import numpy as np

from smd_dist.engine import tasks
from smd_dist.engine.ledger import CODE_FIELDS, NUM_FIELDS, Records

__all__ = ["ResultBuffer", "run_blocks"]


class ResultBuffer:
    """Block results gathered as ledger columns, over the run's tables.

    Parameters
    ----------
    reps : sequence
        The run's reps (``rep_id``, ``content_hash``), in matrix order: a block's pair
        ``(a, b)`` are indices into them.
    metric_names : sequence of str
        The metrics, in the order of a block's columns.
    """

    def __init__(self, reps: Sequence, metric_names: Sequence[str]):
        self._reps = tuple(r.rep_id for r in reps)
        self._hashes = tuple(r.content_hash for r in reps)
        self._metrics = tuple(metric_names)
        self._clear()

    def _clear(self) -> None:
        self._codes: list[np.ndarray] = []
        self._num: list[np.ndarray] = []
        self._words: dict[str, dict[str, int]] = {"solvers": {}, "errors": {}, "workers": {}}
        self.n_pairs = 0

    def __len__(self) -> int:
        return sum(len(c) for c in self._codes)

    def _code(self, table: str, word: str) -> int:
        words = self._words[table]
        return words.setdefault(word, len(words))

    def _remap(self, table: str, words: Sequence[str]) -> np.ndarray:
        """Codes of ``words`` in this buffer's table; the extra last entry maps -1 to -1."""
        return np.array([self._code(table, w) for w in words] + [-1], dtype=np.int32)

    def add(self, a: np.ndarray, b: np.ndarray, result: tasks.BlockResult) -> None:
        """The results of the block of pairs ``(a[k], b[k])``."""
        n_pairs, n_metrics = result.solver.shape
        codes = np.empty((n_pairs, n_metrics, len(CODE_FIELDS)), dtype=np.int32)
        codes[:, :, 0] = np.asarray(a)[:, None]
        codes[:, :, 1] = np.asarray(b)[:, None]
        codes[:, :, 2] = np.arange(n_metrics, dtype=np.int32)[None, :]
        codes[:, :, 3] = self._remap("solvers", result.solvers)[result.solver]
        codes[:, :, 4] = self._remap("errors", result.errors)[result.error]
        codes[:, :, 5] = self._code("workers", result.worker)
        self._codes.append(codes.reshape(-1, len(CODE_FIELDS)))
        self._num.append(result.num.reshape(-1, len(NUM_FIELDS)))
        self.n_pairs += n_pairs

    def add_failed(self, a: np.ndarray, b: np.ndarray, message: str) -> None:
        """The block of pairs ``(a[k], b[k])`` failed as a whole (``message`` for each)."""
        n, n_metrics = len(a), len(self._metrics)
        result = tasks.BlockResult(
            num=np.full((n, n_metrics, len(NUM_FIELDS)), np.nan),
            solver=np.zeros((n, n_metrics), dtype=np.int32),
            error=np.zeros((n, n_metrics), dtype=np.int32),
            solvers=("",),
            errors=(message,),
            worker="",
        )
        self.add(a, b, result)

    def take(self) -> Records:
        """What was added since the last take, as records over the run's tables."""
        if not self._codes:
            return Records.empty()
        records = Records(
            reps=self._reps,
            hashes=self._hashes,
            metrics=self._metrics,
            solvers=tuple(self._words["solvers"]),
            errors=tuple(self._words["errors"]),
            workers=tuple(self._words["workers"]),
            codes=np.concatenate(self._codes),
            num=np.concatenate(self._num),
        )
        self._clear()
        return records


def run_blocks(
    client,
    blocks: list,
    sources: list,
    specs: list,
    device,
    sink,
    buffer: ResultBuffer,
    *,
    progress: bool,
    already: int,
    total: int,
    settings: dict,
    token: str,
    report,
) -> list[Records]:
    """Submit the blocks in waves, write their results as they arrive; return what was
    written (one :class:`~smd_dist.engine.ledger.Records` per ledger part).

    A block names its reps by :class:`~smd_dist.engine.tasks.RepSource` (``sources``, by
    rep index); the worker that runs it uses the prepared reps it keeps, or reads them
    from the store. The pairs computed and the records and pairs written go into
    ``report`` as they happen, so an interrupted run can say what it saved.
    """
    from distributed import wait
    from tqdm.auto import tqdm

    flush_seconds = settings["flush-seconds"]
    fixed_wave = settings["wave-size"]

    def wave_size() -> int:
        # Recomputed as the run goes: on SLURM workers join (and leave) during the run.
        if fixed_wave:
            return int(fixed_wave)
        threads = sum(client.nthreads().values())
        return 4 * max(threads, 1)

    def submit(k: int, block) -> object:
        return client.submit(
            tasks.compare_block,
            block.a,
            block.b,
            {int(i): sources[i] for i in block.reps},
            specs,
            device,
            tasks.KEEP_PREPARED_FRACTION,
            key=f"block-{k}-{len(block)}-{token}",
        )

    written: list[Records] = []
    last_flush = time.monotonic()
    pending: dict = {}
    queue = list(reversed(list(enumerate(blocks))))
    bar = tqdm(
        total=total,
        initial=already,
        unit="pair",
        disable=not progress,
        file=sys.stderr,
        desc="smd-dist",
    )

    def flush() -> None:
        nonlocal last_flush
        pairs = buffer.n_pairs
        records = buffer.take()
        if len(records):
            sink.append(records)
            written.append(records)
            report.n_records_written += len(records)
            report.n_saved += pairs
        last_flush = time.monotonic()

    try:
        wave, sized_at = wave_size(), time.monotonic()
        while queue or pending:
            if time.monotonic() - sized_at > 5.0:
                wave, sized_at = wave_size(), time.monotonic()
            while queue and len(pending) < wave:
                k, block = queue.pop()
                pending[submit(k, block)] = block
            try:
                done, _ = wait(list(pending), timeout=flush_seconds, return_when="FIRST_COMPLETED")
            except TimeoutError:
                done = set()
            for future in done:
                block = pending.pop(future)
                if future.status == "error":
                    err = future.exception()
                    buffer.add_failed(block.a, block.b, f"{type(err).__name__}: {err}")
                else:
                    buffer.add(block.a, block.b, future.result())
                future.release()
                report.n_computed += len(block)
                bar.update(len(block))
            if len(buffer) and (time.monotonic() - last_flush >= flush_seconds or not pending):
                flush()
    finally:
        flush()
        bar.close()
    return written
