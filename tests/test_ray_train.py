"""Training on Ray Train, tracked in a real MLflow server: two workers end to end, one
worker equal to the in-process run, and really killed workers."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import mlflow
import pandas as pd
import psutil
import pytest
from mlflow import MlflowClient

from spam_gpt.cli import main
from spam_gpt.distributed import find_job
from spam_gpt.handed_weights import hand_over, local_weights
from spam_gpt.weights import is_weights_folder

from .conftest import CHAPTER_HAM, CHAPTER_SPAM, free_port
from .fake_hub import hub_layout, published

pytestmark = pytest.mark.usefixtures("local_ray")
RAY_CPUS = 3  # two training workers, and one for Ray Data streaming their rows


def train(out: Path, uri: str, experiment: str, *extra: str) -> int:
    return main(
        [
            "train",
            "--preset",
            "tiny",
            "--workers",
            "2",
            "--tracking-uri",
            uri,
            "--experiment",
            experiment,
            "--output",
            str(out),
            *extra,
        ]
    )


def only_run(client: MlflowClient, experiment: str):
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert len(runs) == 1
    return runs[0]


def steps(client: MlflowClient, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def assert_complete_histories(client: MlflowClient, run_id: str, epochs: int) -> None:
    """Every evaluation and every epoch exactly once, however often workers restarted."""
    evaluations = list(range(0, epochs * 130, 50))
    for key in ("train_loss", "val_loss", "examples_seen"):
        assert steps(client, run_id, key) == evaluations, key
    for key in ("train_accuracy", "val_accuracy"):
        assert steps(client, run_id, key) == list(range(1, epochs + 1)), key


def test_two_workers_end_to_end(tmp_path, mlflow_server, capsys):
    out = tmp_path / "run"
    assert train(out, mlflow_server, "two-workers", "--epochs", "2") == 0
    client = MlflowClient(mlflow_server)
    run = only_run(client, "two-workers")
    run_id = run.info.run_id
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["workers"] == "2" and params["epochs"] == "2" and params["preset"] == "tiny"
    assert params["lr"] == "0.001" and params["batch_size"] == "8"
    assert len(params["dataset_checksum"]) == 64 and params["git_commit"]
    assert_complete_histories(client, run_id, epochs=2)
    metrics = run.data.metrics
    assert metrics["test_accuracy"] >= 0.93
    for key in (
        "final_train_accuracy",
        "final_validation_accuracy",
        "spam_precision",
        "spam_recall",
        "spam_f1",
        "training_seconds",
    ):
        assert key in metrics
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    for name in ("loss-plot", "accuracy-plot", "confusion-matrix"):
        assert {f"{name}.png", f"{name}.pdf"} <= artifacts
    assert {"metrics.json", "checkpoint"} <= artifacts

    version = client.get_model_version("spam-gpt", run.data.tags["spam_gpt.registered_version"])
    assert version.run_id == run_id
    assert float(version.tags["test_accuracy"]) == pytest.approx(metrics["test_accuracy"], abs=1e-4)
    mlflow.set_tracking_uri(mlflow_server)
    pyfunc = mlflow.pyfunc.load_model(f"models:/spam-gpt/{version.version}")
    predicted = pyfunc.predict(pd.DataFrame({"text": [CHAPTER_SPAM, CHAPTER_HAM]}))
    assert predicted["label"].tolist() == ["spam", "not spam"]
    assert predicted["spam_probability"].between(0, 1).all()

    local = json.loads((out / "metrics.json").read_text())
    assert local["test_accuracy"] == pytest.approx(metrics["test_accuracy"])
    capsys.readouterr()
    for ref in (f"models:/spam-gpt/{version.version}", f"runs:/{run_id}/model", str(out / "model")):
        assert (
            main(
                [
                    "classify",
                    "--tracking-uri",
                    mlflow_server,
                    "--model",
                    ref,
                    CHAPTER_SPAM,
                    CHAPTER_HAM,
                ]
            )
            == 0
        )
        labels = [line.split("\t")[0] for line in capsys.readouterr().out.splitlines()]
        assert labels == ["spam", "not spam"], ref


def test_mlflow_models_predict_serves_the_registered_model(tmp_path, mlflow_server):
    client = MlflowClient(mlflow_server)
    version = client.search_model_versions("name='spam-gpt'")[0].version
    request = tmp_path / "input.json"
    request.write_text(json.dumps({"dataframe_records": [{"text": CHAPTER_SPAM}]}))
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "mlflow",
            "models",
            "predict",
            "-m",
            f"models:/spam-gpt/{version}",
            "-i",
            str(request),
            "-t",
            "json",
            "--env-manager",
            "local",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "MLFLOW_TRACKING_URI": mlflow_server},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert '"label": "spam"' in result.stdout


def test_one_worker_streams_the_chapters_epochs(tmp_path, tiny_run):
    """Streamed through Ray Data, one worker takes the chapter's 130 batches of 8 per
    epoch and is evaluated on every row, as the in-process run is (its first epoch is
    compared); the shuffle is Ray Data's, so its accuracy is not the same."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = tmp_path / "one"
    args = [
        "train",
        "--preset",
        "tiny",
        "--epochs",
        "1",
        "--workers",
        "1",
        "--tracking-uri",
        uri,
        "--output",
        str(out),
        "--register-as",
        "",
    ]
    assert main(args) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    ray_run, local = metrics["history"], json.loads((tiny_run / "metrics.json").read_text())
    assert ray_run["global_step"] == 129 and ray_run["examples_seen"] == 130 * 8
    first_epoch = [i for i, step in enumerate(local["history"]["eval_steps"]) if step < 130]
    for key in ("eval_steps", "eval_examples"):
        assert ray_run[key] == [local["history"][key][i] for i in first_epoch], key
    assert sum(map(sum, metrics["confusion_matrix"])) == 300
    assert metrics["test_accuracy"] > 0.9  # local["test_accuracy"] after five epochs: ~0.965


def kill_a_worker_after_first_checkpoint(out: Path, timeout: float = 240) -> int:
    """SIGKILL one Ray Train worker mid-epoch, once Ray has registered an epoch checkpoint
    (its checkpoint manager then writes its snapshot)."""
    deadline = time.monotonic() + timeout
    while not list(out.glob("ray/*/checkpoint_manager_snapshot.json")):
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.2)
    time.sleep(0.5)
    for process in psutil.process_iter(["pid", "cmdline"]):
        if "RayTrainWorker" in " ".join(process.info["cmdline"] or []):
            os.kill(process.info["pid"], signal.SIGKILL)
            return process.info["pid"]
    raise AssertionError("no Ray Train worker process found")


def train_in_background(*args) -> tuple[threading.Thread, list[int]]:
    codes: list[int] = []
    thread = threading.Thread(target=lambda: codes.append(train(*args)))
    thread.start()
    return thread, codes


def test_killed_worker_is_replaced_and_training_resumes(tmp_path, mlflow_server):
    out = tmp_path / "run"
    thread, codes = train_in_background(
        out, mlflow_server, "kill-recover", "--epochs", "2", "--register-as", "kill-recover"
    )
    killed = kill_a_worker_after_first_checkpoint(out)
    thread.join(timeout=600)
    assert codes == [0]
    assert not psutil.pid_exists(killed)
    client = MlflowClient(mlflow_server)
    run = only_run(client, "kill-recover")
    assert run.info.status == "FINISHED"
    assert int(run.data.tags["resumed_from_epoch"]) >= 1
    assert_complete_histories(client, run.info.run_id, epochs=2)
    assert len(client.search_model_versions("name='kill-recover'")) == 1


def test_stopped_job_continues_with_resume(tmp_path, mlflow_server, capsys):
    out = tmp_path / "run"
    thread, codes = train_in_background(
        out,
        mlflow_server,
        "stop-resume",
        "--epochs",
        "2",
        "--max-failures",
        "0",
        "--register-as",
        "stop-resume",
        "--keep",
        "best",
    )
    kill_a_worker_after_first_checkpoint(out)
    thread.join(timeout=600)
    assert codes == [1]
    assert f"spam-gpt train --resume {out}" in capsys.readouterr().err
    client = MlflowClient(mlflow_server)
    run = only_run(client, "stop-resume")
    assert run.info.status == "FAILED"

    assert main(["train", "--resume", run.info.run_id, "--tracking-uri", mlflow_server]) == 0
    run = only_run(client, "stop-resume")
    assert run.info.status == "FINISHED"
    assert int(run.data.tags["resumed_from_epoch"]) >= 1
    assert_complete_histories(client, run.info.run_id, epochs=2)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["test_accuracy"] > 0.9
    # --keep best: the best epoch's weights came through the restart with the checkpoint.
    val_accs = metrics["history"]["val_accs"]
    assert metrics["kept_epoch"] == val_accs.index(max(val_accs)) + 1
    assert metrics["validation_accuracy"] == pytest.approx(val_accs[metrics["kept_epoch"] - 1])

    # Stopped after training ended, before the driver took the outputs (a lost driver, a
    # sweep stopped then): --resume trains nothing more and delivers them.
    shutil.rmtree(out / "model")
    (out / "metrics.json").unlink()
    capsys.readouterr()
    assert main(["train", "--resume", str(out), "--tracking-uri", mlflow_server]) == 0
    printed = capsys.readouterr().out
    assert "Epoch " not in printed and "Test accuracy" in printed
    assert json.loads((out / "metrics.json").read_text()) == metrics
    assert (out / "model" / "model.safetensors").is_file()
    assert only_run(client, "stop-resume").info.status == "FINISHED"
    assert main(["train", "--resume", str(out), "--tracking-uri", mlflow_server]) == 2
    assert f"the job in {out} finished" in capsys.readouterr().err  # nothing left to do


def test_resume_names_what_it_could_not_find(tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match=r"job\.json"):
        find_job(str(tmp_path), f"sqlite:///{tmp_path / 'mlflow.db'}")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert main(["train", "--resume", "0123456789abcdef", "--tracking-uri", uri]) == 2
    assert "--resume 0123456789abcdef" in capsys.readouterr().err


def test_a_job_without_a_cpu_for_ray_data_is_refused_before_any_work(tmp_path, capsys):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = ["train", "--preset", "tiny", "--workers", "3", "--cpus-per-worker", "1"]
    assert main([*args, "--tracking-uri", uri, "--output", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "plus one CPU for Ray Data needs 4 CPUs; the Ray cluster has 3" in err
    assert not (tmp_path / "run").exists()


def test_gpu_work_on_a_cluster_without_gpus_is_refused_at_once(tmp_path, tiny_run, capsys):
    """Ray would wait for the GPUs forever, silently (this Ray has none)."""
    uri = ["--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]
    grid = tmp_path / "grid.yaml"
    grid.write_text("lr: [0.001]\n")
    messages = tmp_path / "messages.csv"
    messages.write_text(f"text\n{CHAPTER_SPAM}\n")
    model, out = str(tiny_run / "model"), str(tmp_path / "out")
    commands = [
        ("worker", ["train", "--preset", "tiny", "--workers", "1", "--output", out, *uri]),
        ("worker", ["sweep", "--preset", "tiny", "--grid", str(grid), "--output", out, *uri]),
        ("actor", ["score", "--model", model, "--input", str(messages), "--output", out]),
        ("replica", ["serve", "--model", model, "--port", str(free_port())]),
    ]
    for per, args in commands:
        assert main([*args, "--gpu"]) == 2, args
        err = capsys.readouterr().err
        assert f"--gpu needs 1 GPU (one per {per}); the Ray cluster has 0" in err, err
    assert not list(tmp_path.glob("out*"))


def test_pretrained_weights_are_fetched_once_for_all_workers(
    tmp_path, mlflow_server, hub, scaled_gpt2_dir
):
    """The driver resolves ``--weights`` through the Hub; the workers, which could not
    reach this Hub (its address is set in this process only), read the driver's files."""
    hub.repo("team/sms-gpt2").add(published(scaled_gpt2_dir, tmp_path))
    out = tmp_path / "run"
    args = ("--weights", "team/sms-gpt2", "--max-steps", "4", "--register-as", "")
    assert train(out, mlflow_server, "hub-weights", *args) == 0
    assert hub.downloads("model.safetensors") == 1 and hub.downloads("config.json") == 1
    run = only_run(MlflowClient(mlflow_server), "hub-weights")
    assert run.data.params["weights"] == "team/sms-gpt2"
    assert json.loads((out / "metrics.json").read_text())["test_accuracy"] > 0


def test_weights_reach_a_node_that_cannot_see_the_drivers_folder(tmp_path, scaled_gpt2_dir):
    """On a cluster of several nodes the files travel through the object store."""
    folder = hub_layout(scaled_gpt2_dir, tmp_path / "snapshot")
    handed = hand_over(str(folder), share=True)
    (tmp_path / "snapshot").rename(tmp_path / "elsewhere")  # as another node sees it
    copied = local_weights(handed)
    assert copied != folder and is_weights_folder(copied)
    for name in ("config.json", "model.safetensors"):
        assert (copied / name).read_bytes() == (tmp_path / "elsewhere" / name).read_bytes()
    assert local_weights(handed) == copied  # once per node
    shutil.rmtree(copied)
