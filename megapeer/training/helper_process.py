"""Set-up for the trainer's helper processes (checkpoint writer, plot worker).

A spawned helper unpickles its entry point before it runs anything, so this module
imports only the standard library: the helper starts in a fraction of a second instead of
re-importing torch and Megatron-Core (~4 s of CPU on a CI core).
"""
import importlib
import os
import signal
import threading
import time


def guard(blocked, trainer_pid, preload=()):
    """In a helper: block the signals in `blocked`, exit once the trainer is gone, and
    import the modules in `preload` (before a manager helper serves its first call).

    A trainer killed with SIGKILL (OOM killer, kill -9) cannot shut its helpers down, and
    a helper that ignores SIGTERM would outlive the job without the watch thread.
    """
    signal.pthread_sigmask(signal.SIG_BLOCK, set(blocked))  # threads started below inherit it

    def watch():
        while os.getppid() == trainer_pid:
            time.sleep(1.0)
        os._exit(0)
    threading.Thread(target=watch, name="exit-with-trainer", daemon=True).start()
    for name in preload:  # here, not in a thread: concurrent imports can deadlock
        importlib.import_module(name)
