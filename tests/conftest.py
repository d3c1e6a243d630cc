"""Shared fixtures: a trained tiny model, random GPT-2 weights written by transformers,
and small local HTTP servers standing in for UCI and the Hugging Face Hub."""

from __future__ import annotations

import contextlib
import functools
import http.server
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest

from spam_gpt.cli import main

from .fake_hub import FakeHub

# Settings a user's shell may hold that would change what the suite does: it sets what it
# depends on itself. Cleared before collection, so every subprocess and Ray worker inherits
# the same neutral environment; the Hugging Face cache and the commands' log files go to
# empty folders of the session (``SESSION_FOLDERS``).
SHELL_SETTINGS = (
    "HF_HUB_OFFLINE",
    "HF_ENDPOINT",
    "HF_TOKEN",
    "HF_HOME",
    "HF_HUB_CACHE",
    "MLFLOW_TRACKING_URI",
    "RAY_ADDRESS",
    "SPAM_GPT_CONFIG",
    "SPAM_GPT_LOG_DIR",
    "SPAM_GPT_API_KEYS",
    "TIKTOKEN_CACHE_DIR",
)


SESSION_FOLDERS = {"HF_HOME": "spam-gpt-tests-hf-home-", "SPAM_GPT_LOG_DIR": "spam-gpt-tests-logs-"}
MADE_FOLDERS = pytest.StashKey[list[str]]()


def pytest_configure(config: pytest.Config) -> None:
    for name in SHELL_SETTINGS:
        os.environ.pop(name, None)
    config.stash[MADE_FOLDERS] = []
    for name, prefix in SESSION_FOLDERS.items():
        os.environ[name] = tempfile.mkdtemp(prefix=prefix)
        config.stash[MADE_FOLDERS].append(os.environ[name])


def pytest_unconfigure(config: pytest.Config) -> None:
    """The run's folders go with it: each run used to leave its Hugging Face home and two
    dozen log files in /tmp."""
    for folder in config.stash[MADE_FOLDERS]:
        shutil.rmtree(folder, ignore_errors=True)


# What Ray, MLflow, setuptools and Python print when they are let through.
NOISE = re.compile(
    r"\bwarn|deprecat|\berror\b|traceback|exception|\bE \d{4}|core_worker|\(raylet\)|"
    r"\(RayTrainWorker|\(pid=|(?-i:INFO)|Downloading artifacts|streaming_executor|\[33m",
    re.IGNORECASE,
)

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


def real_scale_gpt2(seed: int = 0):
    """A random GPT-2 whose every tensor is distinct and non-trivial and whose hidden
    states reach the size real GPT-2's do: biases and LayerNorm shifts drawn from N(0, 0.5),
    LayerNorm scales from U(0.5, 3), weights from N(0, 0.3), small embeddings (N(0, 0.1),
    positions N(0, 0.05)) as GPT-2's are. transformers' own initialisation (std 0.02, zero
    biases, unit LayerNorms) keeps activations where the tanh and exact GELUs agree and
    hides any bias or LayerNorm parameter taken from the wrong tensor; this one does not.
    Its residual stream measures about 150 after the first block and 230 after the second
    (``test_the_real_scale_model_has_real_scale_activations``)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    model = GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=3, n_head=4, n_positions=256)).eval()
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, tensor in model.named_parameters():
            if ".ln_" in name or name.startswith("transformer.ln_f"):
                if name.endswith("weight"):
                    tensor.uniform_(0.5, 3.0, generator=generator)
                else:
                    tensor.normal_(0, 0.5, generator=generator)
            elif name.endswith("wte.weight"):
                tensor.normal_(0, 0.1, generator=generator)
            elif name.endswith("wpe.weight"):
                tensor.normal_(0, 0.05, generator=generator)
            else:
                tensor.normal_(0, 0.5 if name.endswith("bias") else 0.3, generator=generator)
            tensor.masked_fill_(tensor == 0, 1e-3)  # float32 sampling gives an exact 0 at times
    return model


@pytest.fixture(scope="session")
def scaled_gpt2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """:func:`real_scale_gpt2` as ``save_pretrained`` writes it."""
    folder = tmp_path_factory.mktemp("real-scale-gpt2")
    real_scale_gpt2().save_pretrained(folder)
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
    """A free port below Linux's ephemeral range (32768 up), so that no process Ray starts
    (each binds several ports of that range) takes it before the test's server does."""
    while True:
        port = random.randrange(20_000, 32_000)
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port


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


def act_at_line(
    command: list[str], prefix: str, act: Callable[[subprocess.Popen], None], **popen
) -> subprocess.CompletedProcess:
    """Run ``command`` in a session of its own; once a line of its output starts with
    ``prefix``, call ``act`` with it (stop it, take a server away), and let it end."""
    job = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        **popen,
    )
    try:
        deadline = time.monotonic() + 300
        lines = []
        for line in job.stdout:
            lines.append(line)
            assert time.monotonic() < deadline, f"no line starting {prefix!r}"
            if line.startswith(prefix):
                break
        act(job)
        out, err = job.communicate(timeout=300)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(job.pid, signal.SIGKILL)
        job.wait()
    return subprocess.CompletedProcess(command, job.returncode, "".join(lines) + out, err)


def start_mlflow_server(folder: Path, port: int) -> subprocess.Popen:
    """``mlflow server`` on 127.0.0.1:``port`` with its SQLite store and artifacts in
    ``folder`` (the same folder again: the same runs), answering when this returns."""
    log = (folder / "server.log").open("a")
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
    log.close()  # the server holds its own copy
    try:
        wait_for_http(f"http://127.0.0.1:{port}/health", timeout=180, process=process)
    except Exception:
        process.kill()
        raise
    return process


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory):
    """A real ``mlflow server`` on 127.0.0.1 with an SQLite store, once per session
    (its schema migrations take tens of seconds)."""
    port = free_port()
    process = start_mlflow_server(tmp_path_factory.mktemp("mlflow-server"), port)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(timeout=30)


@pytest.fixture(scope="module")
def local_ray(request):
    """A local Ray for one test module (two CPUs, or the module's ``RAY_CPUS``), shut
    down after it with none of its processes left."""
    import ray

    from spam_gpt.ray_cluster import raylet_pids, shutdown_local_ray

    ray.init(num_cpus=getattr(request.module, "RAY_CPUS", 2))
    raylets = raylet_pids()
    yield
    shutdown_local_ray(raylets)


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


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """A local Hub as ``HF_ENDPOINT`` and an empty Hugging Face cache, for this test
    (huggingface_hub reads its settings when imported, so they are set on it here)."""
    import huggingface_hub.constants as hf

    fake = FakeHub()
    monkeypatch.setattr(hf, "ENDPOINT", fake.url)
    template = fake.url + "/{repo_id}/resolve/{revision}/{filename}"
    monkeypatch.setattr(hf, "HUGGINGFACE_CO_URL_TEMPLATE", template)
    monkeypatch.setattr(hf, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(hf, "HF_HUB_OFFLINE", False)
    yield fake
    fake.close()
