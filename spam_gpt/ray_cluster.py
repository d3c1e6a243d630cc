"""Joining a Ray cluster, or starting a local one sized for this machine."""

from __future__ import annotations

import logging
import os

import ray

from spam_gpt import console


def connect(
    address: str | None = None,
    num_cpus: int | None = None,
    runtime_env: dict | None = None,
    metrics_port: int | None = None,
) -> None:
    """Join ``address`` (or ``RAY_ADDRESS``); else start a local Ray with enough CPUs.

    A local Ray gets at least ``num_cpus`` logical CPUs even on a smaller machine, so a job
    asking for more workers than cores runs oversubscribed instead of waiting forever, and
    exports its Prometheus metrics on ``metrics_port`` (default: a free port).
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
        startup = {"worker_maximum_startup_concurrency": max(8, cpus)}
        ray.init(num_cpus=cpus, _system_config=startup, _metrics_export_port=metrics_port, **quiet)
    console.mute()  # Ray Data's and Serve's loggers exist now


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
