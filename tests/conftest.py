"""Shared fixtures: a trained tiny model, random GPT-2 weights written by transformers,
and small local HTTP servers standing in for UCI and the Hugging Face Hub."""

from __future__ import annotations

import functools
import http.server
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from spam_gpt.cli import main

CHAPTER_SPAM = (
    "You are a winner you have been specially selected to receive $1000 cash or a $2000 award."
)
CHAPTER_HAM = "Hey, just wanted to check if we're still on for dinner tonight? Let me know!"


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``spam-gpt train --preset tiny``, run once for the whole session."""
    out = tmp_path_factory.mktemp("tiny-run")
    assert main(["train", "--preset", "tiny", "--output", str(out)]) == 0
    return out


@pytest.fixture(scope="session")
def hf_gpt2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random small GPT-2 as transformers' ``save_pretrained`` writes it."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=256)
    folder = tmp_path_factory.mktemp("hf-gpt2")
    GPT2LMHeadModel(config).eval().save_pretrained(folder)
    return folder


@pytest.fixture
def http_folder():
    """Serve a folder over HTTP on 127.0.0.1; yields a function folder -> base URL."""
    servers = []

    def serve(folder: Path) -> str:
        handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield serve
    for server in servers:
        server.shutdown()
        server.server_close()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for_http(
    url: str,
    timeout: float,
    process: subprocess.Popen | None = None,
    any_status: bool = False,
) -> None:
    """Until ``url`` answers 200 (or, with ``any_status``, answers at all: a server that
    wants a token says 401)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"process for {url} exited with {process.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except urllib.error.HTTPError:
            if any_status:
                return
            time.sleep(0.5)
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {timeout:.0f} s")


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory):
    """A real ``mlflow server`` on 127.0.0.1 with an SQLite store, once per session
    (its schema migrations take tens of seconds)."""
    folder = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    log = (folder / "server.log").open("w")
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
            "--backend-store-uri",
            f"sqlite:///{folder / 'mlflow.db'}",
            "--artifacts-destination",
            str(folder / "artifacts"),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    uri = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(f"{uri}/health", timeout=180, process=process)
        yield uri
    finally:
        process.terminate()
        process.wait(timeout=30)
        log.close()


@pytest.fixture(scope="module")
def local_ray(request):
    """A local Ray for one test module (two CPUs, or the module's ``RAY_CPUS``), shut
    down after it."""
    import ray

    ray.init(num_cpus=getattr(request.module, "RAY_CPUS", 2))
    yield
    ray.shutdown()


def haproxy_running() -> bool:
    """Whether an HAProxy process (Serve's high-throughput ingress) runs on this machine."""
    for comm in Path("/proc").glob("[0-9]*/comm"):
        try:
            if comm.read_text().strip() == "haproxy":
                return True
        except OSError:  # the process ended while we looked
            pass
    return False


THREE_LABELS = ["call a number", "ham", "other spam"]


def three_class_frame():
    """Ham, spam that asks you to call a number, and other spam, from the corpus: 240
    distinct messages each."""
    from spam_gpt.corpus import bundled_corpus_bytes, parse_collection

    corpus = parse_collection(bundled_corpus_bytes()).drop_duplicates("Text")
    spam = corpus[corpus["Label"] == "spam"]
    calls = spam["Text"].str.contains(r"\b0\d{9,}\b", regex=True)
    frames = {
        "call a number": spam[calls].head(240),
        "other spam": spam[~calls].head(240),
        "ham": corpus[corpus["Label"] == "ham"].sample(240, random_state=0),
    }
    import pandas as pd

    rows = pd.concat(
        [pd.DataFrame({"text": f["Text"].tolist(), "label": name}) for name, f in frames.items()]
    )
    return rows.sample(frac=1, random_state=1).reset_index(drop=True)


@pytest.fixture(scope="session")
def three_class_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The three-class messages as Parquet, in three files."""
    folder = tmp_path_factory.mktemp("three-class")
    frame = three_class_frame()
    third = len(frame) // 3 + 1
    for k in range(3):
        frame.iloc[k * third : (k + 1) * third].to_parquet(folder / f"part-{k}.parquet")
    return folder
