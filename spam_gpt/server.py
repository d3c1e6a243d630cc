"""Starting and stopping the Serve application from the command line."""

from __future__ import annotations

import json
import os
import socket
import time
import urllib.request

from spam_gpt import console
from spam_gpt.ray_cluster import connect, require_gpus
from spam_gpt.stopping import stop_on_sigterm

APP_NAME = "spam-gpt"

# Ray Serve's high-throughput mode (Ray >= 2.55): HAProxy, a C load balancer bundled with
# ray[serve] on Linux, takes the port in place of Serve's Python proxy, and the replicas
# answer HTTP themselves. Every Ray process reads these when it starts.
HIGH_THROUGHPUT_ENV = {
    "RAY_SERVE_ENABLE_HA_PROXY": "1",
    "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
    # How long a stopping replica keeps answering so a remote load balancer can drain it;
    # one machine needs little, and Ctrl-C should not take the default 30 s.
    "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "2",
}


def use_high_throughput_ingress(address: str | None) -> None:
    """Set Serve's high-throughput variables for the local Ray this process is about to
    start; a running cluster must have been started with them."""
    import ray

    if address or os.environ.get("RAY_ADDRESS") or ray.is_initialized():
        settings = " ".join(f"{k}={v}" for k, v in HIGH_THROUGHPUT_ENV.items())
        raise ValueError(
            "--high-throughput applies to the local Ray this command starts; for a running "
            f"cluster, start its nodes with {settings} and leave the option out"
        )
    os.environ.update(HIGH_THROUGHPUT_ENV)


def require_free_port(host: str, port: int) -> None:
    """Refuse a port that something here listens on already: Serve's proxy would find it
    taken after Ray has started, and fail with a traceback."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            probe.bind((host, port))
        except OSError as error:
            raise ValueError(
                f"--port {port}: {host}:{port} is taken ({error.strerror}); stop what "
                "listens there, or pass another --port"
            ) from None


def wait_until_healthy(url: str, timeout: float = 300) -> dict:
    """What ``/healthz`` answers once it answers 200."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/healthz", timeout=5) as response:
                if response.status == 200:
                    return json.loads(response.read())
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{url}/healthz did not answer within {timeout:.0f} s")


def classify_over_http(url: str, text: str, timeout: float = 60) -> dict:
    """What the running endpoint at ``url`` answers for ``text``."""
    request = urllib.request.Request(
        f"{url}/classify",
        data=json.dumps({"text": text}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def deploy(
    app_args: dict,
    host: str,
    port: int,
    address: str | None,
    runtime_env: dict | None = None,
    metrics_port: int | None = None,
) -> str:
    """Run the application on Ray Serve and wait until it answers; returns its URL."""
    from ray import serve

    from spam_gpt.serving import build_app

    replicas = app_args.get("max_replicas") or app_args.get("replicas") or 1
    cpus = replicas * app_args.get("threads", 1) + 1
    # The dashboard serves `serve status` and `serve deploy` on a local endpoint.
    connect(
        address, num_cpus=cpus, runtime_env=runtime_env, metrics_port=metrics_port, dashboard=True
    )
    if app_args.get("gpu"):
        require_gpus(app_args.get("min_replicas") or app_args.get("replicas") or 1, "replica")
    serve.start(http_options={"host": host, "port": port})
    args = {k: v for k, v in app_args.items() if v is not None}
    serve.run(build_app(args), name=APP_NAME, route_prefix="/", blocking=False)
    url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"
    wait_until_healthy(url)
    return url


def serve_forever(
    app_args: dict,
    host: str,
    port: int,
    address: str | None,
    runtime_env: dict | None = None,
    detach: bool = False,
    metrics_port: int | None = None,
) -> None:
    """Deploy, then block until Ctrl-C or SIGTERM (even during start-up) and shut Serve
    down cleanly."""
    from ray import serve

    from spam_gpt.ray_cluster import metrics_url

    stop_on_sigterm()  # from the start; connecting to Ray sets it again after ray.init's
    try:
        url = deploy(app_args, host, port, address, runtime_env, metrics_port)
        health = wait_until_healthy(url)  # answers at once now: says whether keys are needed
        print(f"Serving {app_args['model']} at {url} (API docs: {url}/docs)", flush=True)
        if health.get("api_keys") == "required":
            print("API keys required: send Authorization: Bearer KEY", flush=True)
        else:
            print(
                "Open to anyone who can reach it: no API keys (--api-key-file or "
                "SPAM_GPT_API_KEYS to require them)",
                flush=True,
            )
        print(f"Prometheus metrics: {metrics_url()}", flush=True)
        if detach:
            return
        print("Press Ctrl-C to stop.", flush=True)
        while True:
            time.sleep(0.5)
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM as Terminated
        print("Shutting down…", flush=True)
        # Serve's controller ends its own graceful shutdown by killing itself, and Ray
        # reports the killed task as an error: a line for the log, not for the terminal.
        with console.prints_into_log(linger_s=1.0):
            serve.shutdown()
