"""Figures drawn in parallel processes: the PNG and SVG of many grids at once.

matplotlib draws in one thread, and a report has tens of figures, so the report hands them
to a pool of processes (concurrent.futures over a `forkserver` context where the platform
has one, else `spawn`; never `fork`, because the parent holds DuckDB's threads). The pool
starts before the report's queries run, so the workers' imports overlap them. Each worker
keeps one Figure per figure size and redraws into it (plotting.draw(..., figure=)), so the
canvas and its renderer's text-metrics cache are made once per process, not per figure.
A job holds a heatmap (plotting.HeatmapData) or a line figure (lineplot.LinesData, one size).
With one worker (or one figure) everything is drawn in the calling process.

Worker processes import the caller's main module again (as every spawn/forkserver pool does):
a script that calls the report must keep its work under `if __name__ == "__main__":`. If the
workers die anyway, the figures are drawn in the calling process and `broken` says so.
"""

from __future__ import annotations

import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass

from klstore.report import lineplot, plotting

_FIGURES: dict = {}  # in each drawing process: figure size -> the Figure it redraws into


@dataclass(frozen=True)
class DrawJob:
    """One figure to draw: its data and the files to write (format from each suffix)."""

    data: plotting.HeatmapData | lineplot.LinesData
    paths: tuple[str, ...]


def available_cpus() -> int:
    """The CPUs this process may run on (its affinity where the platform tells it)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def draw_one(job: DrawJob) -> float:
    """Draw and save one figure, redrawing into this process's Figure of that size; returns
    the CPU seconds it took (benchmarks add them up)."""
    start = time.process_time()
    if isinstance(job.data, lineplot.LinesData):
        key = ("lines", lineplot.FIGSIZE)
        _FIGURES[key] = lineplot.save(job.data, *job.paths, figure=_FIGURES.get(key))
        return time.process_time() - start
    size = plotting.figure_size(*job.data.values.shape)
    _FIGURES[size] = plotting.save(job.data, *job.paths, figure=_FIGURES.get(size))
    return time.process_time() - start


def _ready() -> int:
    """A worker's first task: import matplotlib's Agg canvas now, not with the first figure."""
    import matplotlib.backends.backend_agg  # noqa: F401
    import matplotlib.figure  # noqa: F401

    return os.getpid()


def _context():
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")
    if "forkserver" in methods:  # the fork server imports these once; each worker forks from it
        context.set_forkserver_preload(
            ["matplotlib.figure", "matplotlib.backends.backend_agg", "klstore.report.drawing"]
        )
    return context


class Drawer:
    """Draws DrawJobs in `workers` processes (None: one per available CPU), or in this process
    when workers <= 1. Start it early (the processes start at once); use it as a context
    manager, or call close()."""

    def __init__(self, workers: int | None = None):
        self.workers = max(1, workers if workers is not None else available_cpus())
        self.broken = False  # the worker processes died; drawn in this process instead
        self.cpu_seconds = 0.0  # spent drawing, in whichever process drew
        self.local_seconds = 0.0  # of which in this process
        self._pool = None
        self._jobs: list[DrawJob] = []
        self._futures: list = []
        if self.workers > 1:
            self._pool = ProcessPoolExecutor(self.workers, mp_context=_context())
            self._warm = [self._pool.submit(_ready) for _ in range(self.workers)]

    def submit(self, jobs: list[DrawJob]) -> None:
        """Start drawing the jobs (in this process: at wait())."""
        self._jobs += jobs
        if self._pool is not None:
            self._futures += [self._pool.submit(draw_one, job) for job in jobs]

    def wait(self) -> int:
        """Wait for every submitted job; returns how many were drawn. The first error is raised
        (close() cancels the rest); if the worker processes died, all are drawn here instead."""
        jobs, futures = self._jobs, self._futures
        self._jobs, self._futures = [], []
        if self._pool is None:
            spent = sum(draw_one(job) for job in jobs)
            self.cpu_seconds += spent
            self.local_seconds += spent
            _FIGURES.clear()
            return len(jobs)
        try:
            self.cpu_seconds += sum(future.result() for future in futures)
        except BrokenProcessPool:
            self.close()
            self.broken = True
            self.submit(jobs)
            return self.wait()
        return len(jobs)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
