"""An MLflow server that stops answering in the middle of a Ray Train job: training goes
on and says so, nothing trained is lost, and ``--resume`` logs the rest once the server
is back. Each command is a process with its own local Ray, as a user runs it."""

from __future__ import annotations

import os
import subprocess
import sys

from mlflow import MlflowClient

from .conftest import act_at_line, free_port, start_mlflow_server


def train_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "spam_gpt.cli", "train", *args]


def stop(server: subprocess.Popen) -> None:
    server.terminate()
    server.wait(timeout=30)


def test_training_goes_on_while_mlflow_is_down_and_resume_logs_the_rest(tmp_path):
    store, out, port = tmp_path / "mlflow", tmp_path / "run", free_port()
    store.mkdir()
    uri = f"http://127.0.0.1:{port}"
    server = start_mlflow_server(store, port)
    # the driver's last request gives up at once rather than after MLflow's minutes of retries
    env = {**os.environ, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"}
    command = train_command(
        "--preset", "tiny", "--epochs", "2", "--workers", "1", "--tracking-uri", uri,
        "--register-as", "outage", "--output", str(out),
    )  # fmt: skip
    try:
        first = act_at_line(command, "Epoch 1/", lambda _: stop(server), env=env)
        stdout, stderr, code = first.stdout, first.stderr, first.returncode
        assert code == 2, stderr
        (second,) = [line for line in stdout.splitlines() if line.startswith("Epoch 2/2")]
        assert "MLflow does not answer: its metrics wait, training goes on" in second
        assert (
            f"training finished and its model is in {out / 'model'}, but MLflow at {uri} did "
            f"not take the results ([Errno 111] Connection refused): once it answers, "
            f"`spam-gpt train --resume {out}` logs them" in stderr
        ), stderr
        assert (out / "model").is_dir() and (out / "metrics.json").is_file()

        server = start_mlflow_server(store, port)
        resumed = subprocess.run(
            train_command("--resume", str(out), "--tracking-uri", uri),
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert resumed.returncode == 0, resumed.stderr
        assert "Epoch" not in resumed.stdout  # nothing trained again
        client = MlflowClient(uri, registry_uri=uri)
        (run,) = client.search_runs([client.get_experiment_by_name("spam-gpt").experiment_id])
        assert run.info.status == "FINISHED" and 0 < run.data.metrics["test_accuracy"] <= 1
        epochs = sorted(m.step for m in client.get_metric_history(run.info.run_id, "val_accuracy"))
        assert epochs == [1, 2]  # the second epoch's point, missed while down, logged after
        (version,) = client.search_model_versions("name='outage'")
        assert version.run_id == run.info.run_id
    finally:
        stop(server)
