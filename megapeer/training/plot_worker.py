"""Render the run's PNGs in a helper process, off the training loop.

A 12-layer expert-usage figure takes ~3 s of matplotlib on a CPU core (2 layers ~0.5 s);
drawn in the trainer, every rank would wait for it at the next collective. The worker is
a spawned process that imports numpy and matplotlib only (training/plots.py), blocks
SIGINT, SIGTERM and SIGUSR1 (a pre-empted job still gets its figures) and exits with its
trainer. `close()` waits for every queued figure; a figure that fails is a warning, never
a failed run.
"""
import atexit
import logging
import multiprocessing as mp
import os
import queue
import signal
import time

log = logging.getLogger("megapeer.train")

_JOBS = ("plot_run", "save_usage_plots")


def _serve(jobs, results, trainer_pid):
    from .helper_process import guard
    guard({signal.SIGINT, signal.SIGTERM, signal.SIGUSR1}, trainer_pid)
    from . import plots
    while True:
        job = jobs.get()
        if job is None:
            return
        name, args = job
        try:
            getattr(plots, name)(*args)
            results.put((name, args[-1], None))
        except Exception as e:  # reported by the trainer
            results.put((name, args[-1], f"{type(e).__name__}: {e}"))


class PlotWorker:
    """submit(name, *args) queues plots.<name>(*args); close() waits for all of them."""

    def __init__(self, timeout_s=600.0):
        self.timeout_s = timeout_s
        self._proc = None
        self._pending = 0

    def submit(self, name, *args):
        if name not in _JOBS:
            raise ValueError(f"unknown plot job {name!r}: expected one of {_JOBS}")
        if self._proc is None:
            ctx = mp.get_context("spawn")
            self._jobs, self._results = ctx.Queue(), ctx.Queue()
            self._proc = ctx.Process(target=_serve, name="megapeer-plots", daemon=True,
                                     args=(self._jobs, self._results, os.getpid()))
            self._proc.start()
            atexit.register(self.close)  # a run that stops on an error keeps its figures
        self._jobs.put((name, args))
        self._pending += 1
        self._drain(block=False)

    def _drain(self, block):
        """Collect finished figures; with block, until none is pending, the worker dies
        or timeout_s passes."""
        deadline = time.monotonic() + self.timeout_s
        while self._pending:
            try:
                name, what, err = self._results.get(timeout=1.0) if block else \
                    self._results.get_nowait()
            except queue.Empty:
                if not block:
                    return
                if not self._proc.is_alive():
                    log.warning("plots: the plot worker died (exit code %s); %d figure(s) "
                                "lost", self._proc.exitcode, self._pending)
                    return
                if time.monotonic() > deadline:
                    log.warning("plots: %d figure(s) not finished after %.0f s; not waiting",
                                self._pending, self.timeout_s)
                    return
                continue
            self._pending -= 1
            if err is not None:
                log.warning("could not plot (%s, %s): %s", name, what, err)

    def close(self):
        """Wait for every queued figure, then stop the worker."""
        if self._proc is None:
            return
        self._jobs.put(None)
        self._drain(block=True)
        self._proc.join(timeout=30)
        if self._proc.is_alive():
            self._proc.kill()
        self._proc = None
