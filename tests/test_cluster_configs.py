"""Cluster definitions checked offline: the launcher config against Ray's schema, the
KubeRay manifests for their required fields, entry points and settings that exist here."""

from __future__ import annotations

import importlib
import shlex
from pathlib import Path

import pytest
import yaml

from spam_gpt.api_keys import KEYS_VARIABLE
from spam_gpt.cli import build_parser
from spam_gpt.server import HIGH_THROUGHPUT_ENV

ROOT = Path(__file__).resolve().parents[1]
KUBERAY = ROOT / "cluster" / "kuberay"
IMAGE_ROOT = "/app/"  # cluster/Dockerfile copies the repository here


def documents(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((KUBERAY / name).read_text()) if d]


def test_launcher_config_passes_rays_own_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((ROOT / "cluster" / "aws-gpu.yaml").read_text())
    validate_config(prepare_config(config))  # as `ray up` does: defaults, then ray-schema.json
    assert config["available_node_types"]["gpu_worker"]["max_workers"] >= 1
    assert any("pip install -e ~/spam-gpt" in c for c in config["setup_commands"])
    assert config["file_mounts"]["~/spam-gpt"] == "."


def ray_cluster_spec_ok(spec: dict) -> None:
    assert spec["rayVersion"] == "2.60.0"
    head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert head["image"] and head["name"]
    for group in spec["workerGroupSpecs"]:
        assert (
            group["groupName"] and group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        )
        assert group["template"]["spec"]["containers"][0]["image"] == head["image"]


def repo_path(path: str) -> Path:
    assert path.startswith(IMAGE_ROOT), path
    target = ROOT / path.removeprefix(IMAGE_ROOT)
    assert target.is_file(), f"{path} does not exist in this repository"
    return target


def check_entrypoint(entrypoint: str, command: str) -> None:
    """``python /app/jobs/<command>.py [--config /app/x.yaml] ARGS`` with real options."""
    words = shlex.split(entrypoint)
    assert words[0] == "python" and repo_path(words[1]).name == f"{command}.py"
    args = words[2:]
    if "--config" in args:
        at = args.index("--config")
        repo_path(args[at + 1])
        del args[at : at + 2]
    build_parser().parse_args([command, *args])  # exits on an unknown or bad option


@pytest.mark.parametrize(
    ("name", "command"), [("rayjob-train.yaml", "train"), ("rayjob-score.yaml", "score")]
)
def test_rayjobs_run_real_entry_points_with_real_options(name, command):
    (job,) = documents(name)
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    assert job["metadata"]["name"]
    check_entrypoint(job["spec"]["entrypoint"], command)
    ray_cluster_spec_ok(job["spec"]["rayClusterSpec"])


def test_raycluster_manifest():
    (cluster,) = documents("raycluster.yaml")
    assert (cluster["apiVersion"], cluster["kind"]) == ("ray.io/v1", "RayCluster")
    ray_cluster_spec_ok(cluster["spec"])


def test_rayservice_deploys_the_real_application():
    from ray.serve.schema import ServeDeploySchema

    (service,) = documents("rayservice.yaml")
    assert (service["apiVersion"], service["kind"]) == ("ray.io/v1", "RayService")
    config = yaml.safe_load(service["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(config)
    (app,) = config["applications"]
    module, _, attribute = app["import_path"].partition(":")
    build_app = getattr(importlib.import_module(module), attribute)
    build_app(app["args"])  # every key is one the builder takes
    cluster = service["spec"]["rayClusterConfig"]
    ray_cluster_spec_ok(cluster)
    pods = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    assert app["args"]["model"] == "models:/spam-gpt@champion"  # followed, no redeploy
    assert not any("key" in name for name in app["args"])  # keys never in the config
    for pod in pods:  # Serve's HAProxy ingress on every node, as `serve --high-throughput`
        env = {e["name"]: e for e in pod["template"]["spec"]["containers"][0]["env"]}
        for name in ("RAY_SERVE_ENABLE_HA_PROXY", "RAY_SERVE_THROUGHPUT_OPTIMIZED"):
            assert env[name]["value"] == HIGH_THROUGHPUT_ENV[name]
        assert env[KEYS_VARIABLE]["valueFrom"]["secretKeyRef"]["name"] == "spam-gpt-api-keys"


def test_mlflow_manifest_serves_the_uri_the_jobs_use():
    kinds = {d["kind"]: d for d in documents("mlflow.yaml")}
    assert {"Deployment", "Service", "PersistentVolumeClaim"} <= set(kinds)
    assert kinds["Service"]["metadata"]["name"] == "mlflow"
    assert kinds["Service"]["spec"]["ports"][0]["port"] == 5000
    assert (
        "--tracking-uri http://mlflow:5000"
        in documents("rayjob-train.yaml")[0]["spec"]["entrypoint"]
    )
