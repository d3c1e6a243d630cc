"""`spam-gpt sweep` as a user runs it, each command a process with the local Ray it
starts: four trials, two at once, each a Ray Train run that is a child of the sweep's run in
a real MLflow server. The sweep is stopped with Ctrl-C once a trial has finished and
continued with ``--resume``; then it must hold what an uninterrupted sweep holds, and the
best trial is registered and loads."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest
from mlflow import MlflowClient

from spam_gpt.cli import main

from .conftest import CHAPTER_SPAM, act_at_line

EXPERIMENT = "sweep"


@dataclass
class Sweep:
    out: Path
    client: MlflowClient
    stopped: subprocess.CompletedProcess
    again: subprocess.CompletedProcess  # a new sweep into the stopped one's --output
    resumed: subprocess.CompletedProcess


def sweep_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "spam_gpt.cli", "sweep", *args]


@pytest.fixture(scope="module")
def sweep(mlflow_server, tmp_path_factory) -> Sweep:
    out = tmp_path_factory.mktemp("sweep")
    grid = out / "grid.yaml"
    grid.write_text("trainable: [all, lora]\nlr: [0.001, 0.002]\n")
    command = sweep_command(
        "--preset",
        "tiny",
        "--grid",
        str(grid),
        "--epochs",
        "1",
        "--max-steps",
        "40",
        "--trials-at-once",
        "2",
        "--tracking-uri",
        mlflow_server,
        "--experiment",
        EXPERIMENT,
        "--register-as",
        "sweep-best",
        "--output",
        str(out),
    )
    # Ctrl-C (SIGINT to its process group) once a trial has finished
    stopped = act_at_line(command, "Trial ", lambda job: os.killpg(job.pid, signal.SIGINT))
    client = MlflowClient(mlflow_server, registry_uri=mlflow_server)
    # a trial can end its run FINISHED just before the stop marks the running runs failed
    row = json.loads(next(out.glob("trials/*/summary.json")).read_text())["row"]
    client.set_terminated(row["run_id"], status="FAILED")
    again = subprocess.run(command, capture_output=True, text=True, timeout=60)
    resumed = subprocess.run(
        sweep_command("--resume", str(out)), capture_output=True, text=True, timeout=600
    )
    assert resumed.returncode == 0, resumed.stderr
    return Sweep(out, client, stopped, again, resumed)


def test_ctrl_c_stops_the_sweep_and_resume_runs_only_the_trials_left(sweep, capsys):
    stopped, out = sweep.stopped, sweep.out
    assert stopped.returncode == 130 and "Traceback" not in stopped.stderr, stopped.stderr
    said = re.search(
        rf"stopped with (\d) of 4 trials finished; continue it with `spam-gpt sweep --resume "
        rf"{re.escape(str(out))}`",
        stopped.stderr,
    )
    assert said and int(said[1]) >= 1, stopped.stderr
    assert sweep.again.returncode == 2 and "did not finish" in sweep.again.stderr
    # a trial may finish as Ctrl-C lands, after the message and unprinted
    resumed = re.search(
        r"(\d) of 4 trials finished before; running the other (\d)", sweep.resumed.stdout
    )
    assert resumed and int(resumed[1]) >= int(said[1]) and int(resumed[2]) == 4 - int(resumed[1])
    before, after = (trials_done(run.stdout) for run in (stopped, sweep.resumed))
    # the resumed sweep ran only the others
    assert 1 <= len(before) <= int(resumed[1]) and len(after) == int(resumed[2])
    assert not set(before) & set(after)
    assert main(["sweep", "--resume", str(out)]) == 2  # nothing left: not registered again
    assert f"the sweep in {out} finished" in capsys.readouterr().err


def trials_done(stdout: str) -> list[int]:
    """The trials a sweep's output says finished."""
    return [int(n) for n in re.findall(r"^Trial (\d)/4 \(.*validation", stdout, re.MULTILINE)]


def test_the_parent_run_has_four_child_runs_with_test_accuracy(sweep):
    out, client = sweep.out, sweep.client
    experiment = client.get_experiment_by_name(EXPERIMENT)
    runs = client.search_runs([experiment.experiment_id])
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == 4 and all(r.info.status == "FINISHED" for r in children)
    assert all(0 < r.data.metrics["test_accuracy"] <= 1 for r in children)
    assert {r.data.params["trainable"] for r in children} == {"all", "lora"}
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"summary.csv", "summary.md", "test-accuracy.png"} <= artifacts
    summary = pd.read_csv(out / "summary.csv")
    assert len(summary) == 4 and summary["error"].isna().all()  # every trial reported
    by_run = {r.info.run_id: r.data.metrics["test_accuracy"] for r in children}
    assert dict(zip(summary["run_id"], summary["test_accuracy"])) == pytest.approx(by_run)


def test_lora_trials_train_under_a_tenth_of_the_parameters(sweep):
    out = sweep.out
    summary = pd.read_csv(out / "summary.csv")
    lora = summary[summary["variant"].str.startswith("trainable=lora")]
    full = summary[summary["variant"].str.startswith("trainable=all")]
    assert len(lora) == len(full) == 2
    assert (lora["trainable_parameters"] < 0.1 * full["trainable_parameters"].max()).all()


def test_the_best_trial_is_registered_and_classify_loads_it(sweep, mlflow_server, capsys):
    out, client = sweep.out, sweep.client
    summary = pd.read_csv(out / "summary.csv")
    ranked = summary.sort_values(
        ["validation_accuracy", "trainable_parameters", "trial"], ascending=[False, True, True]
    )
    best = ranked.iloc[0]
    version = client.get_model_version("sweep-best", "1")
    assert version.run_id == best["run_id"]
    parent = client.get_run(client.get_run(best["run_id"]).data.tags["mlflow.parentRunId"])
    assert json.loads(parent.data.tags["spam_gpt.best_trial"])["run_id"] == best["run_id"]
    for run_id in summary["run_id"]:  # only the best trial's model goes to MLflow
        logged = {a.path for a in client.list_artifacts(run_id)}
        assert ("checkpoint" in logged) == (run_id == best["run_id"]), logged
    assert (
        main(
            [
                "classify",
                "--model",
                "models:/sweep-best/1",
                "--tracking-uri",
                mlflow_server,
                "--json",
                CHAPTER_SPAM,
            ]
        )
        == 0
    )
    record = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert record["label"] in {"spam", "not spam"}
