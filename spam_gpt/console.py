"""What a person sees: spam-gpt's own lines on the terminal, everyone else's in a log file.

Ray forwards every worker's and actor's output to the driver (Train's result records,
Data's operator plans, Serve's replica logs, C++ core-worker lines) and MLflow draws
progress bars; on a terminal that buries the product's own lines. :func:`quiet` sends the
Python logs of Ray, MLflow and their dependencies, and Python's warnings, to a log file,
tells Ray not to forward its processes' output (it stays in Ray's own log files) and
MLflow not to draw progress bars unless on a terminal. ``--verbose`` skips all of it.

Lines that Ray Train's rank-0 worker wants a person to read travel back through a
:class:`EpochRelay`, a Ray queue the driver prints from.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from pathlib import Path

from tqdm import tqdm

NOISY_LOGGERS = ("ray", "mlflow", "alembic", "urllib3", "filelock", "py.warnings")
LOG_DIR_VARIABLE = "SPAM_GPT_LOG_DIR"  # where each run's log file goes


class Console:
    """Where this process's logs go: ``log_file``, or the terminal when ``verbose``."""

    def __init__(self, log_file: Path | None = None, verbose: bool = False):
        self.verbose = verbose
        self.log_file = log_file
        self.handler: logging.Handler | None = None

    def file_handler(self) -> logging.Handler:
        if self.handler is None:
            self.handler = logging.FileHandler(self.log_file)
            format = "%(asctime)s %(levelname)s %(name)s: %(message)s"
            self.handler.setFormatter(logging.Formatter(format))
            self.handler.spam_gpt = True  # ours: a later run's mute() replaces it
        return self.handler


CURRENT = Console(verbose=True)


def default_log_file(command: str) -> Path:
    """``<command>-<time>-<pid>.log`` in ``$SPAM_GPT_LOG_DIR`` (default
    ``$TMPDIR/spam-gpt``): one file per run, kept for reading."""
    folder = Path(os.environ.get(LOG_DIR_VARIABLE) or Path(tempfile.gettempdir()) / "spam-gpt")
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"{command}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"


def quiet(log_file: Path, verbose: bool = False) -> Console:
    """Route the libraries' logs and warnings to ``log_file`` (nothing, when ``verbose``)."""
    global CURRENT
    if CURRENT.handler is not None:
        CURRENT.handler.close()
    CURRENT = Console(log_file, verbose)
    if verbose:
        return CURRENT
    os.environ.setdefault(
        "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "true" if sys.stderr.isatty() else "false"
    )
    log_file.parent.mkdir(parents=True, exist_ok=True)
    logging.captureWarnings(True)
    warnings.simplefilter("default")  # every warning once per place, into the log
    for name in NOISY_LOGGERS:
        logging.getLogger(name).propagate = False
    mute()
    return CURRENT


def mute() -> None:
    """Swap the terminal handlers of the libraries' loggers for the log file. Ray Data and
    Ray Serve install theirs when imported, so this runs again once Ray is up."""
    if CURRENT.verbose or CURRENT.log_file is None:
        return
    file_handler = CURRENT.file_handler()
    loggers = [logging.getLogger(name) for name in NOISY_LOGGERS]
    loggers += [
        logger
        for name, logger in logging.root.manager.loggerDict.items()
        if isinstance(logger, logging.Logger) and name.split(".")[0] in NOISY_LOGGERS
    ]
    for logger in loggers:
        terminal = [h for h in logger.handlers if is_terminal_handler(h)]
        earlier = [h for h in logger.handlers if getattr(h, "spam_gpt", False)]
        for handler in terminal + earlier:
            logger.removeHandler(handler)
        if terminal or earlier or (logger.name in NOISY_LOGGERS and not logger.handlers):
            logger.addHandler(file_handler)


def is_terminal_handler(handler: logging.Handler) -> bool:
    return isinstance(handler, logging.StreamHandler) and not isinstance(
        handler, logging.FileHandler
    )


@contextmanager
def quieted(log_file: Path, verbose: bool = False) -> Iterator[Console]:
    """:func:`quiet`, and for its duration the process's file descriptor 2 (where Ray's
    C++ core worker and child processes write) into the log file too, while Python's
    ``sys.stderr`` (spam-gpt's errors, progress bars) still reaches the terminal."""
    quiet(log_file, verbose)
    if verbose:
        yield CURRENT
        return
    python_stderr = sys.stderr
    sys.stderr.flush()
    saved = os.dup(2)
    if python_stderr is sys.__stderr__:
        sys.stderr = open(os.dup(saved), "w", buffering=1)  # noqa: SIM115 - closed below
    with open(log_file, "ab") as log:
        os.dup2(log.fileno(), 2)
    try:
        yield CURRENT
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        if sys.stderr is not python_stderr:
            sys.stderr.close()
            sys.stderr = python_stderr


@contextmanager
def prints_into_log(linger_s: float = 0.0) -> Iterator[None]:
    """For a moment when only the libraries speak (a Serve shutdown, a Tune run, a model
    registration): this process's ``print`` output, to stdout and stderr, into the log
    file, ``linger_s`` seconds beyond the block for reports that arrive late. Nothing
    changes when verbose."""
    if CURRENT.verbose or CURRENT.log_file is None:
        yield
        return
    with open(CURRENT.log_file, "a") as log, redirect_stdout(log), redirect_stderr(log):
        yield
        time.sleep(linger_s)


def where_logs_are() -> str | None:
    """The line that ends a quiet run: where Ray's and the libraries' logs went."""
    log_file = CURRENT.log_file
    if CURRENT.verbose or log_file is None:
        return None
    ray_logs = ray_log_folder()
    written = log_file.exists() and log_file.stat().st_size > 0
    if not (ray_logs or written):
        return None
    also = f"; Ray's: {ray_logs}" if ray_logs else ""
    return f"Logs: {log_file}{also} (--verbose shows them here)"


def ray_log_folder() -> str | None:
    import ray

    if not ray.is_initialized():
        return None
    try:
        return ray._private.worker.global_worker.node.get_logs_dir_path()
    except AttributeError:  # connected to a remote cluster: its logs are on its head node
        return None


class EpochRelay:
    """Epoch lines from Ray Train's rank 0, printed by the driver, since Ray does not
    forward workers' output here when quiet; on a terminal they also advance a bar of
    epochs. Create on the driver and pass ``relay.queue`` to the workers, which ``put``
    lines into it."""

    def __init__(self, epochs: int):
        from ray.util.queue import Queue

        self.bar = tqdm(total=epochs, unit="epoch", disable=not sys.stderr.isatty(), leave=False)
        self.queue = Queue(actor_options={"num_cpus": 0})
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self.pump, daemon=True)
        self.thread.start()

    def pump(self) -> None:
        from ray.util.queue import Empty

        while not (self.stopping.is_set() and self.queue.empty()):
            try:
                self.epoch_done(self.queue.get(timeout=0.2))
            except Empty:
                continue

    def epoch_done(self, line: str) -> None:
        if self.bar.disable:
            print(line, flush=True)
        else:
            self.bar.write(line)
            self.bar.update(1)

    def close(self) -> None:
        """Print what is left, then stop."""
        self.stopping.set()
        self.thread.join(timeout=10)
        self.queue.shutdown()
        self.bar.close()

    def __enter__(self) -> EpochRelay:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
