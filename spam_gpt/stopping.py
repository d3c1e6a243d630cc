"""How a command stops: SIGTERM as Ctrl-C does."""

from __future__ import annotations

import signal
import threading


class Terminated(KeyboardInterrupt):
    """SIGTERM (``kill``, ``ray job stop``, a scheduler), raised in the main thread so that
    a command stops as on Ctrl-C: its MLflow run marked failed, a scoring job's saved parts
    named, Serve shut down."""


def raise_terminated(*_) -> None:
    raise Terminated


def stop_on_sigterm() -> None:
    """SIGTERM raises :class:`Terminated`; ``ray.init`` puts in a bare ``sys.exit(15)``,
    which skips all of that (and at times aborted the interpreter on its way out)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, raise_terminated)
