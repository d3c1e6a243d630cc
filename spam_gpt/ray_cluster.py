"""Joining a Ray cluster, or starting a local one sized for this machine (and leaving
none of its processes behind)."""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import signal
import threading
import time
from pathlib import Path

import ray

from spam_gpt import console
from spam_gpt.stopping import stop_on_sigterm

BLOCK_FETCH_THREAD = "iter_threaded"  # the name Ray Data 2.60 gives them


def connect(
    address: str | None = None,
    num_cpus: int | None = None,
    runtime_env: dict | None = None,
    metrics_port: int | None = None,
    dashboard: bool = False,
) -> None:
    """Join ``address`` (or ``RAY_ADDRESS``); else start a local Ray with enough CPUs.

    A local Ray gets at least ``num_cpus`` logical CPUs even on a smaller machine, so a job
    asking for more workers than cores runs oversubscribed instead of waiting forever, and
    exports its Prometheus metrics on ``metrics_port`` (default: a free port). It runs its
    dashboard only when asked: it lives only as long as the command, and on 2 cores the
    dashboard's processes slowed a scoring job by about 5 % (benchmarks/RESULTS.md).

    Its workers run at the command's own priority. Ray's default (``worker_niceness`` 15)
    makes them yield to every other process, which suits a dedicated cluster node; here the
    command's work is in the workers, and beside two busy processes a 200-row scoring job
    took 14.7 s at the command's priority and had not finished after 200 s at nice 15.
    """
    if ray.is_initialized():
        return
    verbose = console.CURRENT.verbose  # quiet: Ray's processes log to Ray's files only
    quiet = {"log_to_driver": verbose, "logging_level": logging.INFO if verbose else logging.ERROR}
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, runtime_env=runtime_env, **quiet)
    else:
        cpus = max(os.cpu_count() or 1, num_cpus or 1)
        # A training job starts a worker process per worker, Ray Data's and Train's actors
        # and the progress relay at once, a sweep that for each trial running; Ray warns
        # past 4x this many (default: cores).
        startup = {"worker_maximum_startup_concurrency": max(8, cpus), "worker_niceness": 0}
        ray.init(
            num_cpus=cpus,
            include_dashboard=dashboard,
            _system_config=startup,
            _metrics_export_port=metrics_port,
            **quiet,
        )
        atexit.register(shutdown_local_ray, raylet_pids())  # runs before Ray's own handler
    stop_on_sigterm()
    console.mute()  # Ray Data's and Serve's loggers exist now


def raylet_pids() -> set[int]:
    """The raylets this process started (a local Ray's), found in ``/proc``; none
    elsewhere than on Linux."""
    pids = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()  # "PID (NAME) STATE PPID ..."
        except OSError:
            continue
        name, after = text[text.find("(") + 1 : text.rfind(")")], text[text.rfind(")") + 2 :]
        if name == "raylet" and int(after.split()[1]) == os.getpid():
            pids.add(int(stat.parent.name))
    return pids


def workers_of(raylets: set[int]) -> list[int]:
    """Live processes that a raylet of ``raylets`` started (Ray sets ``RAY_RAYLET_PID``)."""
    found = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            variables = environ.read_bytes().split(b"\0")
        except OSError:
            continue
        if any(f"RAY_RAYLET_PID={pid}".encode() in variables for pid in raylets):
            found.append(int(environ.parent.name))
    return found


def shutdown_local_ray(raylets: set[int], grace_s: float = 5.0) -> list[int]:
    """Shut the local Ray down, then kill its worker processes still there after
    ``grace_s``: Ray 2.60's core worker can deadlock in its own exit handlers (seen here: a
    ``ray::TrainController`` that outlived its cluster by hours, holding 460 MB). Returns
    the processes killed."""
    let_block_fetches_finish(grace_s)
    ray.shutdown()
    deadline = time.monotonic() + grace_s
    while (left := workers_of(raylets)) and time.monotonic() < deadline:
        time.sleep(0.1)
    for pid in left:
        with contextlib.suppress(ProcessLookupError):  # it ended meanwhile
            os.kill(pid, signal.SIGKILL)
    return left


def let_block_fetches_finish(timeout_s: float) -> None:
    """Wait for Ray Data's threads that fetch an iteration's blocks (``iter_threaded``):
    after an iteration stops they finish the block in hand, and one that touches Ray after
    ``ray.shutdown()`` makes Ray's core worker end the process with exit code 1 (seen under
    load: a scoring job stopped with SIGTERM exited 1, not 143, about once in ten)."""
    deadline = time.monotonic() + timeout_s
    for thread in threading.enumerate():
        if thread.name == BLOCK_FETCH_THREAD and thread is not threading.current_thread():
            thread.join(max(0.0, deadline - time.monotonic()))


def metrics_url() -> str:
    """Where Prometheus scrapes this node's metrics (every node of a cluster has its own)."""
    here = ray.get_runtime_context().get_node_id()
    node = next(n for n in ray.nodes() if n["NodeID"] == here)
    return f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"


def require_cpus(needed: int, what: str) -> None:
    """Refuse work the cluster cannot schedule, which would otherwise wait forever."""
    available = ray.cluster_resources().get("CPU", 0)
    if needed > available:
        raise ValueError(
            f"{what} needs {needed} CPUs; the Ray cluster has {available:g}; lower them"
        )


def require_gpus(needed: int, per: str) -> None:
    """Refuse ``--gpu`` where the cluster has too few GPUs: Ray would wait for them
    forever (seen: a job on a machine without a GPU, silent until killed)."""
    available = ray.cluster_resources().get("GPU", 0)
    if needed > available:
        raise ValueError(
            f"--gpu needs {needed} GPU{'s' if needed > 1 else ''} (one per {per}); the Ray "
            f"cluster has {available:g}: drop --gpu, or join a cluster with GPUs (--address)"
        )
