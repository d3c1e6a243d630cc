"""Three labels end to end on a local Ray: streamed training on two workers tracked in a
real MLflow server, then classify, the MLflow pyfunc, Ray Data scoring and the Serve API
all answering with those labels."""

from __future__ import annotations

import json
import urllib.request

import mlflow
import pandas as pd
import pyarrow.parquet as pq
import pytest
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from spam_gpt.cli import main

from .conftest import THREE_LABELS, free_port

pytestmark = pytest.mark.usefixtures("local_ray")
RAY_CPUS = 3  # two training workers, and one for Ray Data streaming their rows
CALL = "URGENT! Your mobile won a prize. Call 09061701461 now to claim"
HAM = "ok see you at the station at 6, bring the umbrella"
MAX_STEPS = 150


@pytest.fixture(scope="module")
def three_class_run(three_class_data, mlflow_server, tmp_path_factory):
    out = tmp_path_factory.mktemp("three-class-run")
    args = [
        "train",
        "--preset",
        "tiny",
        "--epochs",
        "3",
        "--max-steps",
        str(MAX_STEPS),  # 63 steps an epoch: stops part way through the third
        "--workers",
        "2",
        "--data",
        str(three_class_data),
        "--tracking-uri",
        mlflow_server,
        "--experiment",
        "three-labels",
        "--register-as",
        "three-labels",
        "--output",
        str(out),
    ]
    assert main(args) == 0
    client = MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name("three-labels")
    (run,) = client.search_runs([experiment.experiment_id])
    return out, run


def test_the_run_has_per_label_metrics_and_a_three_by_three_confusion(
    three_class_run, mlflow_server
):
    out, run = three_class_run
    assert run.info.status == "FINISHED"
    metrics, params = run.data.metrics, run.data.params
    assert params["labels"] == ",".join(THREE_LABELS) and params["workers"] == "2"
    assert params["train_rows"] == "504" and params["test_rows"] == "144"
    for label in THREE_LABELS:
        for score in ("precision", "recall", "f1"):
            assert 0.0 <= metrics[f"{score}/{label}"] <= 1.0
    assert metrics["macro_f1"] > 0.5 and metrics["test_accuracy"] > 0.6
    assert "spam_precision" not in metrics
    local = json.loads((out / "metrics.json").read_text())
    confusion = local["confusion_matrix"]
    assert len(confusion) == 3 and all(len(row) == 3 for row in confusion)
    assert sum(map(sum, confusion)) == 144  # every test row, counted once over both workers
    assert [sum(row) for row in confusion] == [48, 48, 48]
    client = MlflowClient(mlflow_server)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"confusion-matrix.png", "metrics.json"} <= artifacts
    version = client.get_model_version("three-labels", run.data.tags["spam_gpt.registered_version"])
    assert version.tags["labels"] == ",".join(THREE_LABELS)


def test_classify_and_the_pyfunc_answer_with_the_three_labels(
    three_class_run, mlflow_server, capsys
):
    reference = "models:/three-labels/latest"
    capsys.readouterr()
    args = ["classify", "--json", "--tracking-uri", mlflow_server, "--model", reference, CALL]
    assert main(args) == 0
    record = json.loads(capsys.readouterr().out)
    assert set(record["probabilities"]) == set(THREE_LABELS) and record["label"] in THREE_LABELS
    mlflow.set_tracking_uri(mlflow_server)
    pyfunc = mlflow.pyfunc.load_model(reference)
    predicted = pyfunc.predict(pd.DataFrame({"text": [CALL, HAM]}))
    assert list(predicted.columns) == ["label", "probability", "probabilities"]
    assert set(predicted["label"]) <= set(THREE_LABELS)
    for row in predicted.itertuples():
        assert set(row.probabilities) == set(THREE_LABELS)
        assert row.probability == pytest.approx(max(row.probabilities.values()))
    # what `mlflow models serve` answers as a 400 with this message, not "unexpected error"
    with pytest.raises(MlflowException, match=r"rows \[1\] have no text") as refused:
        pyfunc.predict(pd.DataFrame({"text": [CALL, "  "]}))
    assert refused.value.error_code == "INVALID_PARAMETER_VALUE"


def test_scoring_writes_the_label_and_a_struct_of_probabilities(three_class_run, tmp_path):
    out, _ = three_class_run
    pd.DataFrame({"id": [1, 2, 3], "text": [CALL, HAM, None]}).to_parquet(tmp_path / "in.parquet")
    args = ["score", "--model", str(out / "model"), "--input", str(tmp_path / "in.parquet")]
    assert main([*args, "--output", str(tmp_path / "scored")]) == 0
    table = pq.read_table(tmp_path / "scored").sort_by("id")
    assert "spam_probability" not in table.column_names
    assert [f.name for f in table.schema.field("probabilities").type] == THREE_LABELS
    rows = table.to_pylist()
    assert rows[0]["label"] in THREE_LABELS and rows[2]["label"] is None
    assert rows[0]["probability"] == pytest.approx(max(rows[0]["probabilities"].values()))
    assert rows[2]["probabilities"] is None and rows[2]["score_error"] == "text is null"


def test_the_serve_api_answers_with_the_three_labels(three_class_run):
    from ray import serve

    from spam_gpt.server import classify_over_http, deploy

    out, _ = three_class_run
    url = deploy({"model": str(out / "model")}, "127.0.0.1", free_port(), address=None)
    try:
        answer = classify_over_http(url, CALL)
        assert answer["label"] in THREE_LABELS and "spam_probability" not in answer
        assert set(answer["probabilities"]) == set(THREE_LABELS)
        assert answer["probability"] == pytest.approx(answer["probabilities"][answer["label"]])
        with urllib.request.urlopen(f"{url}/model", timeout=30) as response:
            assert json.loads(response.read())["labels"] == THREE_LABELS
    finally:
        serve.shutdown()


def test_max_steps_stops_a_streamed_run_early(three_class_run):
    out, _ = three_class_run
    history = json.loads((out / "metrics.json").read_text())["history"]
    assert history["global_step"] == MAX_STEPS - 1
    assert history["examples_seen"] == MAX_STEPS * 8
    assert history["stopped_at_max_steps"] and history["epochs_done"] == 3
    assert history["eval_steps"] == list(range(0, MAX_STEPS, 50))


def test_a_file_the_scan_cannot_read_is_named_without_rays_traceback(tmp_path, capsys):
    """The scan runs as Ray tasks: their error reaches the command line as spam-gpt's own."""
    (tmp_path / "m.csv").write_bytes("text,label\nhi,a\nCaf\u00e9,b\n".encode("cp1252"))
    args = ["train", "--preset", "tiny", "--workers", "1", "--data", str(tmp_path / "m.csv")]
    assert main([*args, "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("spam-gpt train: error: ") and "is not UTF-8: byte 0xe9 on line 3" in err
    assert "ray::" not in err and "File " not in err
