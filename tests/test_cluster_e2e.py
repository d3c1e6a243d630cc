"""End to end on a real Ray head: submit training, scoring and serving with
``ray job submit --working-dir .``, then classify over HTTP and stop the head."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from mlflow import MlflowClient

from spam_gpt.server import classify_over_http

from .conftest import CHAPTER_HAM, CHAPTER_SPAM, free_port, wait_for_http

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def ray_head():
    """A Ray head on 127.0.0.1 with 3 logical CPUs and a dashboard (the job server).

    Ray 2.60 heads want a token, and ``ray start`` creates none: the head and every client
    here share a fresh one through ``RAY_AUTH_TOKEN``, so a machine that never ran Ray
    (no ``~/.ray/auth_token``) works too.
    """
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"  # jobs run `python` from here
    env["RAY_AUTH_MODE"] = "token"
    env["RAY_AUTH_TOKEN"] = secrets.token_hex(32)
    gcs, dashboard = free_port(), free_port()
    try:
        started = subprocess.run(
            [
                str(BIN / "ray"),
                "start",
                "--head",
                "--node-ip-address=127.0.0.1",
                f"--port={gcs}",
                "--num-cpus=3",  # two training workers and Ray Data
                "--include-dashboard=true",
                "--dashboard-host=127.0.0.1",
                f"--dashboard-port={dashboard}",
                "--disable-usage-stats",
            ],
            env=env,
            timeout=300,
            capture_output=True,
            text=True,
        )
        assert started.returncode == 0, started.stdout[-3000:] + started.stderr[-3000:]
        url = f"http://127.0.0.1:{dashboard}"
        wait_for_http(f"{url}/api/version", timeout=120, any_status=True)
        yield url, env
    finally:  # also after a failed start, which may leave a head running
        subprocess.run([str(BIN / "ray"), "stop"], env=env, timeout=180, capture_output=True)


def submit(ray_head, script: str, *args: str) -> str:
    url, env = ray_head
    result = subprocess.run(
        [
            str(BIN / "ray"),
            "job",
            "submit",
            "--address",
            url,
            "--working-dir",
            str(ROOT),
            "--",
            "python",
            f"jobs/{script}",
            *args,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "succeeded" in result.stdout, result.stdout[-3000:]
    return result.stdout


def test_train_score_serve_as_submitted_jobs(ray_head, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    # preset, workers and the registered name come from the repository's ray_config.yaml;
    # one epoch is enough for the chapter's messages (epochs are tested in test_ray_train)
    submit(
        ray_head,
        "train.py",
        "--epochs",
        "1",
        "--tracking-uri",
        uri,
        "--experiment",
        "cluster-e2e",
        "--output",
        str(tmp_path / "train"),
    )
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("cluster-e2e").experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.params["workers"] == "2" and run.data.params["preset"] == "tiny"
    assert run.data.params["epochs"] == "1"
    assert run.data.metrics["test_accuracy"] > 0.9
    assert client.search_model_versions("name='spam-gpt'")

    archive = tmp_path / "messages.parquet"
    pq.write_table(pa.table({"id": [1, 2, 3], "text": [CHAPTER_SPAM, CHAPTER_HAM, None]}), archive)
    output = submit(
        ray_head,
        "score.py",
        "--model",
        "models:/spam-gpt/latest",
        "--tracking-uri",
        uri,
        "--input",
        str(archive),
        "--output",
        str(tmp_path / "scored"),
    )
    assert "Read 3 rows: 2 scored, 1 errored" in output
    scored = pq.read_table(tmp_path / "scored").sort_by("id").to_pylist()
    assert [row["label"] for row in scored] == ["spam", "not spam", None]
    assert scored[0]["model"] == "models:/spam-gpt/1"

    port = free_port()
    submit(
        ray_head,
        "serve.py",
        "--model",
        "models:/spam-gpt/latest",
        "--tracking-uri",
        uri,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--detach",
    )
    endpoint = f"http://127.0.0.1:{port}"
    wait_for_http(f"{endpoint}/healthz", timeout=120)
    for text, label in ((CHAPTER_SPAM, "spam"), (CHAPTER_HAM, "not spam")):
        answer = classify_over_http(endpoint, text)
        assert answer["label"] == label
        assert answer["model"] == {"name": "spam-gpt", "version": "1"}
