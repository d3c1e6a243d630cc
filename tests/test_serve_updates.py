"""Live model updates over real HTTP: the endpoint follows ``models:/NAME@ALIAS`` on a
real MLflow server, switches versions under load without a failed request, and leaves a
version that fails to load alone."""

from __future__ import annotations

import threading
import time
from collections import Counter

import pytest

from spam_gpt.checkpoint import load_meta
from spam_gpt.live_model import LiveModel
from spam_gpt.predictor import Predictor
from spam_gpt.server import deploy

from .conftest import CHAPTER_SPAM, free_port
from .test_serving import call, post

MODEL = "live-spam-gpt"
RELOAD_S = 5.0


@pytest.fixture(scope="module")
def registry(mlflow_server, tiny_run):
    """Versions 1 and 2 of one model (the same checkpoint, logged twice) and version 3,
    whose files are missing; the alias ``champion`` on version 1."""
    from mlflow import MlflowClient

    from spam_gpt.tracking import ensure_experiment, log_pyfunc_model

    client = MlflowClient(mlflow_server, registry_uri=mlflow_server)
    run = client.create_run(ensure_experiment(client, "live-updates"))
    checkpoint = tiny_run / "model"
    labels = load_meta(checkpoint).labels
    for _ in range(2):
        log_pyfunc_model(mlflow_server, run.info.run_id, checkpoint, MODEL, labels)
    client.create_model_version(
        MODEL, f"{run.info.artifact_uri}/no-such-model", run_id=run.info.run_id
    )
    client.set_registered_model_alias(MODEL, "champion", "1")
    return client


@pytest.fixture(scope="module")
def service(registry, mlflow_server):
    import ray
    from ray import serve

    args = {
        "model": f"models:/{MODEL}@champion",
        "tracking_uri": mlflow_server,
        "reload_interval_s": RELOAD_S,
        "max_batch_size": 8,
        "precision": "int8",  # every version loads quantised
    }
    url = deploy(args, "127.0.0.1", free_port(), address=None)
    yield url
    serve.shutdown()
    ray.shutdown()


class Load:
    """Eight clients classifying without pause; each answer's status and model version."""

    def __init__(self, url: str, clients: int = 8):
        self.url = url
        self.answers: list[tuple[float, int, str | None]] = []
        self.stopping = threading.Event()
        self.threads = [threading.Thread(target=self.client) for _ in range(clients)]

    def client(self) -> None:
        while not self.stopping.is_set():
            status, body = post(self.url, "/classify", {"text": CHAPTER_SPAM})
            version = body["model"]["version"] if status == 200 else None
            self.answers.append((time.monotonic(), status, version))

    def __enter__(self) -> Load:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *_) -> None:
        self.stopping.set()
        for thread in self.threads:
            thread.join()


def wait_for_version(url: str, version: str, timeout: float) -> float:
    """Seconds until ``/model`` names ``version``."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if call(url, "/model", key=None)[1]["version"] == version:
            return time.monotonic() - started
        time.sleep(0.2)
    raise AssertionError(f"version {version} did not answer within {timeout:.0f} s")


def wait_for_error(url: str) -> dict:
    """``/model`` once it reports a failure to follow the alias (or after three intervals)."""
    deadline = time.monotonic() + 3 * RELOAD_S
    while time.monotonic() < deadline:
        _, model = call(url, "/model", key=None)
        if model["following"]["last_error"]:
            break
        time.sleep(0.5)
    return model


def test_the_alias_moved_under_load_switches_without_a_failed_request(service, registry):
    status, model = call(service, "/model", key=None)
    assert status == 200 and (model["name"], model["version"]) == (MODEL, "1")
    assert model["following"]["alias"] == f"models:/{MODEL}@champion"
    with Load(service) as load:
        time.sleep(2)
        registry.set_registered_model_alias(MODEL, "champion", "2")
        moved = time.monotonic()
        took = wait_for_version(service, "2", timeout=2 * RELOAD_S)
        time.sleep(2)  # answers from the new version under the same load
    statuses = Counter(status for _, status, _ in load.answers)
    assert statuses == {200: len(load.answers)}, statuses
    versions = [version for _, _, version in load.answers]
    assert versions[0] == "1" and versions[-1] == "2"
    first_new = next(at for at, _, version in load.answers if version == "2")
    assert first_new - moved <= 2 * RELOAD_S and took <= 2 * RELOAD_S
    assert all(version == "2" for at, _, version in load.answers if at > first_new + 1)


def test_a_version_that_fails_to_load_leaves_the_old_one_answering(service, registry):
    wait_for_version(service, "2", timeout=2 * RELOAD_S)  # as the test above leaves it
    registry.set_registered_model_alias(MODEL, "champion", "3")
    model = wait_for_error(service)
    assert model["version"] == "2"
    assert (
        "version 3 of live-spam-gpt (alias champion) failed to load"
        in (model["following"]["last_error"])
    )
    assert "version 2 keeps answering" in model["following"]["last_error"]
    status, answer = post(service, "/classify", {"text": CHAPTER_SPAM})
    assert status == 200 and answer["model"]["version"] == "2"
    registry.set_registered_model_alias(MODEL, "champion", "1")  # and back: it follows again
    wait_for_version(service, "1", timeout=2 * RELOAD_S)
    assert call(service, "/model", key=None)[1]["following"]["last_error"] is None


def test_a_deleted_alias_is_reported_in_one_line_and_the_model_keeps_answering(service, registry):
    wait_for_version(service, "1", timeout=2 * RELOAD_S)  # as the test above leaves it
    registry.delete_registered_model_alias(MODEL, "champion")
    model = wait_for_error(service)
    error = model["following"]["last_error"]
    assert error.startswith(f"cannot look up models:/{MODEL}@champion: "), error
    assert "\n" not in error and "http" not in error and len(error) < 300, error
    status, answer = post(service, "/classify", {"text": CHAPTER_SPAM})
    assert status == 200 and answer["model"]["version"] == "1"
    registry.set_registered_model_alias(MODEL, "champion", "1")
    deadline = time.monotonic() + 3 * RELOAD_S
    while call(service, "/model", key=None)[1]["following"]["last_error"]:
        assert time.monotonic() < deadline, "the restored alias was not found again"
        time.sleep(0.5)


def test_a_registry_that_does_not_answer_is_reported_within_seconds(tiny_run, monkeypatch):
    for name in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT"):
        monkeypatch.delenv(name, raising=False)  # MLflow's defaults: minutes of retries
    checkpoint = str(tiny_run / "model")
    model = LiveModel(
        f"models:/{MODEL}@champion",
        load=lambda _: Predictor.from_checkpoint(checkpoint),
        tracking_uri=f"http://127.0.0.1:{free_port()}",
    )
    started = time.monotonic()
    model.check()
    assert time.monotonic() - started < 60
    error = model.status()["last_error"]
    assert error == f"cannot look up models:/{MODEL}@champion: [Errno 111] Connection refused"
    assert model.current.meta.version is not None  # the loaded model stays
