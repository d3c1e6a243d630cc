"""`spam-gpt serve` as a user runs it: it comes up, answers, and stops cleanly on Ctrl-C."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from spam_gpt.cli import main
from spam_gpt.server import classify_over_http

from .conftest import CHAPTER_SPAM, NOISE, free_port, haproxy_running, wait_for_http


@pytest.mark.parametrize("keyed", [False, True], ids=["serve-proxy-open", "haproxy-keys"])
def test_serve_blocks_until_ctrl_c_then_shuts_down(tiny_run, tmp_path, keyed):
    """Open behind Serve's proxy, stopped with Ctrl-C; behind HAProxy with an API key
    file, stopped with SIGTERM (`kill`, `docker stop`, Kubernetes) just as cleanly."""
    key_file = tmp_path / "api-keys"
    key_file.write_text("serve-command-key\n")
    options = ["--high-throughput", "--api-key-file", str(key_file)] if keyed else []
    port = free_port()
    log = (tmp_path / "serve.log").open("w")
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "spam_gpt.cli",
            "serve",
            "--model",
            str(tiny_run / "model"),
            "--port",
            str(port),
            *options,
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(f"{url}/healthz", timeout=240, process=process)
        deadline = time.monotonic() + 60
        while "Press Ctrl-C" not in (tmp_path / "serve.log").read_text():
            assert time.monotonic() < deadline, "serve never said it was ready"
            time.sleep(0.2)
        if keyed:
            with pytest.raises(urllib.error.HTTPError, match="401"):
                classify_over_http(url, CHAPTER_SPAM, timeout=30)
        else:
            assert classify_over_http(url, CHAPTER_SPAM, timeout=30)["label"] == "spam"
        assert haproxy_running() == keyed
        process.send_signal(signal.SIGTERM if keyed else signal.SIGINT)
        assert process.wait(timeout=120) == 0
    finally:
        process.kill()
        log.close()
    output = (tmp_path / "serve.log").read_text()
    assert f"Serving {tiny_run / 'model'} at {url}" in output and "Shutting down" in output
    assert ("API keys required" if keyed else "Open to anyone who can reach it") in output
    assert re.search(r"Prometheus metrics: http://\S+:\d+/metrics", output)
    assert not [line for line in output.splitlines() if NOISE.search(line)]  # Ray's: in its log
    assert output.splitlines()[-1].startswith("Logs: ")
    try:
        urllib.request.urlopen(f"{url}/healthz", timeout=5)
        raise AssertionError("the endpoint still answers after Ctrl-C")
    except OSError:
        pass
    assert not haproxy_running()


def test_high_throughput_on_a_running_cluster_says_where_to_set_it(tiny_run, capsys):
    argv = ["serve", "--model", str(tiny_run / "model"), "--high-throughput"]
    assert main([*argv, "--address", "10.0.0.1:6379"]) == 2
    error = capsys.readouterr().err
    assert "start its nodes with RAY_SERVE_ENABLE_HA_PROXY=1" in error
    assert "RAY_SERVE_THROUGHPUT_OPTIMIZED=1" in error


@pytest.mark.parametrize("command", ["serve", "score"])
def test_int8_on_a_gpu_is_refused_before_ray_starts(tiny_run, tmp_path, capsys, command):
    import ray

    args = [command, "--model", str(tiny_run / "model"), "--gpu", "--precision", "int8"]
    if command == "score":
        args += ["--input", str(tmp_path / "in.parquet"), "--output", str(tmp_path / "out")]
    assert main(args) == 2
    assert "--precision int8 runs on CPUs; on a GPU use bf16" in capsys.readouterr().err
    assert not ray.is_initialized()


def test_a_missing_key_file_stops_serve_before_ray_starts(tiny_run, tmp_path, capsys):
    import ray

    missing = tmp_path / "no-such-keys"
    assert main(["serve", "--model", str(tiny_run / "model"), "--api-key-file", str(missing)])
    assert f"cannot read the API key file {missing}" in capsys.readouterr().err
    assert not ray.is_initialized()


def test_a_port_something_listens_on_is_refused_before_ray_starts(tiny_run, capsys):
    import socket

    import ray

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", "--model", str(tiny_run / "model"), "--port", str(port)]) == 2
    assert f"--port {port}: 127.0.0.1:{port} is taken" in capsys.readouterr().err
    assert not ray.is_initialized()


@pytest.mark.parametrize("origin", ["https://app.example.com/", "app.example.com"])
def test_an_origin_no_browser_sends_is_refused_before_ray_starts(tiny_run, capsys, origin):
    import ray

    args = ["serve", "--model", str(tiny_run / "model"), "--port", str(free_port())]
    assert main([*args, "--allow-origin", origin]) == 2
    assert f"allowed origin {origin!r}: give a browser origin" in capsys.readouterr().err
    assert not ray.is_initialized()
