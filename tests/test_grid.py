"""Sweep grids: expanded in order, typed, checked before anything runs; and the summary's
choice of the best trial."""

from __future__ import annotations

import pytest

from spam_gpt.cli import main
from spam_gpt.grid import GridError, expand_grid, load_grid
from spam_gpt.sweep_summary import best_trial, markdown_table, summary_frame

from .conftest import free_port


def grid_file(tmp_path, text: str) -> str:
    path = tmp_path / "grid.yaml"
    path.write_text(text)
    return str(path)


def test_the_book_grid_is_trainable_by_token_by_padding():
    trials = expand_grid(load_grid("book"), "tiny", {"epochs": 1})
    assert len(trials) == 5 * 2 * 2
    assert trials[0].variant == "trainable=last_layer token=last padding=fixed"
    assert {t.config.trainable for t in trials} == {
        "last_layer",
        "last_block",
        "last_two_blocks",
        "all",
        "lora",
    }
    assert all(t.config.epochs == 1 and t.config.model == "tiny" for t in trials)


def test_seeds_repeat_each_variant_and_values_take_their_options_type(tmp_path):
    grid = load_grid(grid_file(tmp_path, "--lr: [1e-3, 5e-4]\nseed: [1, 2]\nkeep: best\n"))
    trials = expand_grid(grid, "tiny")
    assert [(t.variant, t.seed) for t in trials] == [
        ("lr=0.001 keep=best", 1),
        ("lr=0.001 keep=best", 2),
        ("lr=0.0005 keep=best", 1),
        ("lr=0.0005 keep=best", 2),
    ]
    assert trials[2].config.lr == 5e-4 and trials[3].config.seed == 2
    assert [t.number for t in trials] == [1, 2, 3, 4]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("learning_rate: [0.1]\n", "'learning_rate' is not a training option; known options:"),
        ("lr: []\n", "grid option 'lr' has an empty list"),
        ("lr: [0.1\n", "is not valid YAML"),
        ("- lr\n- seed\n", "must map training options to lists of values"),
        ("epochs: [two]\n", "grid option 'epochs': 'two' is not an integer"),
        ("preset: [tiny]\n", "'preset' is not a training option (give it with --preset)"),
        ("trainable: [all, most]\n", "grid variant trainable=most: trainable must be one of"),
    ],
)
def test_a_grid_that_cannot_run_says_why(tmp_path, text, message):
    with pytest.raises(GridError) as error:
        expand_grid(load_grid(grid_file(tmp_path, text)), "tiny")
    assert message in str(error.value)


def test_the_sweep_command_refuses_a_bad_grid_before_starting_ray(tmp_path, capsys):
    path = grid_file(tmp_path, "lr: []\n")
    assert main(["sweep", "--grid", path, "--output", str(tmp_path / "out")]) == 2
    assert "grid option 'lr' has an empty list" in capsys.readouterr().err
    assert main(["sweep", "--grid", str(tmp_path / "none.yaml"), "--output", "x"]) == 2
    assert "no such file; give a YAML file or 'book'" in capsys.readouterr().err


def test_the_best_trial_has_the_best_validation_accuracy_then_fewer_parameters():
    def row(trial, accuracy, parameters, error=""):
        return {
            "trial": trial,
            "variant": f"v{trial}",
            "seed": 1,
            "validation_accuracy": accuracy,
            "test_accuracy": 0.9,
            "macro_f1": 0.9,
            "trainable_parameters": parameters,
            "training_seconds": 1.0,
            "run_id": f"r{trial}",
            "error": error,
        }

    frame = summary_frame(
        [
            row(3, 0.95, 100),
            row(1, 0.97, 5000),
            row(2, 0.97, 400),
            {"trial": 4, "variant": "v4", "seed": 1, "error": "boom"},
        ]
    )
    assert best_trial(frame)["trial"] == 2
    table = markdown_table(frame)
    assert "| 2 | v2 | 1 | 97.00% | 90.00% | 90.00% | 400 | 1.0 |" in table
    assert "| 4 | v4 | 1 | failed: boom |" in table
    assert (
        best_trial(summary_frame([{"trial": 1, "variant": "v", "seed": 1, "error": "x"}])) is None
    )


def test_a_sweep_that_mlflow_does_not_answer_at_the_end_says_how_to_finish_it(
    tmp_path, monkeypatch
):
    from mlflow import MlflowClient

    from spam_gpt.sweep import SweepSettings, finish_sweep

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # not minutes of retries
    uri = f"http://127.0.0.1:{free_port()}"  # where no server listens
    settings = SweepSettings(output=str(tmp_path), tracking_uri=uri, parent_run_id="a1")
    frame = summary_frame([{"trial": 1, "variant": "v", "seed": 1, "error": "x"}])
    with pytest.raises(ValueError) as raised:
        finish_sweep(MlflowClient(uri), settings, frame, None)
    assert str(raised.value) == (
        f"the trials are in {tmp_path / 'trials'}, but MLflow at {uri} did not take the sweep's "
        "summary ([Errno 111] Connection refused): once it answers, `spam-gpt sweep --resume "
        f"{tmp_path}` finishes it"
    )
    assert (tmp_path / "summary.md").is_file()  # written before MLflow was asked
