"""`spam-gpt sweep` on a local Ray: four trials, two at once, each a Ray Train run that
is a child of the sweep's run in a real MLflow server; the best is registered and loads."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from mlflow import MlflowClient

from spam_gpt.cli import main

from .conftest import CHAPTER_SPAM

pytestmark = pytest.mark.usefixtures("local_ray")
RAY_CPUS = 4  # two trials, each one worker and one CPU for Ray Data


@pytest.fixture(scope="module")
def sweep(mlflow_server, tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep")
    grid = out / "grid.yaml"
    grid.write_text("trainable: [all, lora]\nlr: [0.001, 0.002]\n")
    args = [
        "sweep",
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
        "sweep",
        "--register-as",
        "sweep-best",
        "--output",
        str(out),
    ]
    assert main(args) == 0
    return out, MlflowClient(mlflow_server, registry_uri=mlflow_server)


def test_the_parent_run_has_four_child_runs_with_test_accuracy(sweep):
    out, client = sweep
    experiment = client.get_experiment_by_name("sweep")
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
    out, _ = sweep
    summary = pd.read_csv(out / "summary.csv")
    lora = summary[summary["variant"].str.startswith("trainable=lora")]
    full = summary[summary["variant"].str.startswith("trainable=all")]
    assert len(lora) == len(full) == 2
    assert (lora["trainable_parameters"] < 0.1 * full["trainable_parameters"].max()).all()


def test_the_best_trial_is_registered_and_classify_loads_it(sweep, mlflow_server, capsys):
    out, client = sweep
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
