"""ray_config.yaml: defaults for the jobs, overridden by the command line, validated."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from spam_gpt.cli import build_parser, command_parsers, job_main
from spam_gpt.settings import SettingsError, load_settings, settings_arguments

ROOT = Path(__file__).resolve().parents[1]
PARSERS = command_parsers(build_parser())


def arguments(tmp_path: Path, text: str, command: str = "train") -> list[str]:
    path = tmp_path / "ray_config.yaml"
    path.write_text(text)
    return settings_arguments(command, load_settings(path), PARSERS, str(path))


def test_the_repositorys_file_is_valid_for_every_job():
    settings = load_settings(ROOT / "ray_config.yaml")
    for command in settings:
        if command != "common":
            settings_arguments(command, settings, PARSERS, "ray_config.yaml")


def test_file_defaults_then_command_line_wins(tmp_path):
    args = arguments(
        tmp_path,
        "common: {tracking_uri: 'sqlite:///x.db'}\n"
        "train: {preset: tiny, workers: 2, gpu: true, lr: 0.01}\n",
    )
    assert args == [
        "--tracking-uri",
        "sqlite:///x.db",
        "--preset",
        "tiny",
        "--workers",
        "2",
        "--gpu",
        "--lr",
        "0.01",
    ]
    parsed = build_parser().parse_args(["train", *args, "--workers", "1"])
    assert (parsed.workers, parsed.gpu, parsed.lr, parsed.preset) == (1, True, 0.01, "tiny")


def test_runtime_env_is_a_mapping_passed_as_json(tmp_path):
    args = arguments(tmp_path, "common: {runtime_env: {env_vars: {A: '1'}}}\n", "score")
    assert args == ["--runtime-env", '{"env_vars": {"A": "1"}}']
    parsed = build_parser().parse_args(
        ["score", "--model", "m", "--input", "i", "--output", "o", *args]
    )
    assert parsed.runtime_env == {"env_vars": {"A": "1"}}
    with pytest.raises(SettingsError, match="runtime_env: expected a mapping"):
        arguments(tmp_path, "common: {runtime_env: pip}\n", "score")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("train: {wrokers: 2}\n", "train.wrokers is not a `spam-gpt train` option"),
        ("train: {workers: two}\n", "train.workers: expected an integer, got 'two'"),
        ("train: {gpu: 1}\n", "train.gpu: expected true or false"),
        ("train: {preset: huge}\n", "train.preset: expected one of chapter, fast, tiny"),
        ("common: {colour: red}\n", "common.colour is not an option of any job"),
        ("trian: {}\n", "unknown section(s) trian"),
        ("train: [\n", "not valid YAML"),
    ],
)
def test_unknown_or_ill_typed_fields_are_named(tmp_path, text, message):
    with pytest.raises(SettingsError) as error:
        arguments(tmp_path, text)
    assert message in str(error.value)


def test_job_entry_reports_a_bad_file(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: {epochs: many}\n")
    assert job_main("train", ["--config", str(bad)]) == 2
    assert "train.epochs: expected an integer" in capsys.readouterr().err


def test_train_job_script_takes_spam_gpt_train_options():
    result = subprocess.run(
        [sys.executable, str(ROOT / "jobs" / "train.py"), "--help"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert result.returncode == 0
    assert "--workers" in result.stdout and "--resume" in result.stdout


def test_serve_config_file_builds_the_application():
    import yaml
    from ray.serve.schema import ServeDeploySchema

    from spam_gpt.serving import build_app

    config = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    ServeDeploySchema.model_validate(config)  # Ray's own schema for `serve deploy`
    (app,) = config["applications"]
    assert app["import_path"] == "spam_gpt.serving:build_app"
    application = build_app(app["args"])
    deployment = application._bound_deployment
    assert deployment._deployment_config.autoscaling_config.max_replicas == 4
    with pytest.raises(ValueError, match=r"args\.model"):
        build_app({})
