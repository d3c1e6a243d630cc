"""``spam-gpt sweep``: a grid of training runs on Ray Tune, each trial a Ray Train run.

The driver scans the data and resolves the weights once, opens the sweep's parent MLflow
run and hands Tune one function per trial. That function opens the trial's child run and
fits a ``TorchTrainer`` exactly as ``spam-gpt train --workers`` does (Tune's own
``TuneReportCallback`` forwards its epoch reports), then reports the trial's summary row.
At the end the parent run holds the summary table and plot; the best trial (validation
accuracy, ties to fewer trainable parameters) gets its model logged in its child run, and
registered when asked. Every trial's checkpoint stays in ``OUTPUT/trials/NN/model``.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import pandas as pd
from mlflow import MlflowClient
from mlflow.entities import Metric
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback

from spam_gpt import console
from spam_gpt.config import TrainConfig
from spam_gpt.distributed import new_job, run_job, weights_for_workers
from spam_gpt.grid import Trial
from spam_gpt.handed_weights import HandedWeights
from spam_gpt.labelled import DataSpec, LabelledInputs, SplitPlan
from spam_gpt.sweep_summary import (
    best_trial,
    failed_row,
    markdown_table,
    summary_frame,
    summary_row,
    write_summary,
)
from spam_gpt.tracking import log_model_of_run, open_run

SWEEP_TAG = "spam_gpt.sweep"
# A trial's function only waits on its Ray Train run, whose workers (and Ray Data) hold the
# CPUs; Tune needs some resource per trial, so it reserves memory rather than a CPU.
TRIAL_DRIVER_RESOURCES = {"CPU": 0, "memory": 256 * 2**20}


@dataclass
class SweepSettings:
    """What every trial of a sweep shares: where it writes, how it trains and tracks."""

    output: str
    workers: int = 1
    cpus_per_worker: int = 1
    gpu: bool = False
    tracking_uri: str = ""
    experiment: str = "spam-gpt"
    max_failures: int = 3
    data: dict | None = None  # DataSpec fields; None: the chapter's splits
    name: str = ""
    parent_run_id: str = ""

    def trial_output(self, number: int) -> str:
        return str(Path(self.output) / "trials" / f"{number:02d}")


@dataclass
class SweepResult:
    summary: pd.DataFrame
    best: pd.Series | None
    registered_version: str | None


def run_trial(
    config: dict,
    settings: SweepSettings,
    inputs: LabelledInputs,
    plan: SplitPlan,
    weights: dict[str, HandedWeights | None],
) -> None:
    """One trial, in Tune's trial actor: a child run, a Ray Train fit, a summary row."""
    trial = config["trial"]
    cfg = TrainConfig(**trial["config"])
    job = new_job(
        cfg,
        plan,
        output=settings.trial_output(trial["number"]),
        workers=settings.workers,
        cpus_per_worker=settings.cpus_per_worker,
        gpu=settings.gpu,
        tracking_uri=settings.tracking_uri,
        experiment=settings.experiment,
        register_as=None,  # the sweep registers its best trial only
        max_failures=settings.max_failures,
        storage_path=None,
        data=None if settings.data is None else DataSpec(**settings.data),
        name=f"{settings.name}-trial-{trial['number']:02d}",
        parent_run_id=settings.parent_run_id,
        log_model=False,  # every trial's model stays in its folder; the best is logged
    )
    metrics = run_job(
        job, inputs, plan, weights[cfg.weights], show_epochs=False, callbacks=[TuneReportCallback()]
    )
    tune.report({"summary": summary_row(trial, job.run_id, metrics)})


class TrialLines(tune.Callback):
    """Each trial's summary row as it arrives, and a line per finished or failed trial,
    printed by the driver to ``out`` (the terminal, while Tune's own output goes to the
    log). Rows are kept as reported: the epoch reports that Tune's callback forwards from
    Ray Train may reach Tune after the row, so a trial's last result need not hold it."""

    def __init__(self, total: int, out: TextIO):
        self.total = total
        self.out = out
        self.rows: dict[int, dict] = {}

    def __getstate__(self) -> dict:  # Tune saves its callbacks with the experiment
        return {"total": self.total}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["total"], sys.stdout)

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        if "summary" in result:
            self.rows[result["summary"]["trial"]] = result["summary"]

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        row = self.rows.get(trial.config["trial"]["number"])
        if row:
            print(
                f"Trial {row['trial']}/{self.total} ({row['variant']}, seed {row['seed']}): "
                f"validation {row['validation_accuracy']:.2%}, test {row['test_accuracy']:.2%}, "
                f"{row['training_seconds']:.0f} s",
                file=self.out,
                flush=True,
            )

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        number = trial.config["trial"]["number"]
        print(
            f"Trial {number}/{self.total} failed; see {trial.local_path}", file=self.out, flush=True
        )


def trial_label(trial) -> str:
    return f"trial-{trial.config['trial']['number']:02d}"


def run_sweep(
    trials: list[Trial],
    settings: SweepSettings,
    inputs: LabelledInputs,
    plan: SplitPlan,
    *,
    trials_at_once: int,
    params: dict,
    register_as: str | None = None,
) -> SweepResult:
    """Run every trial on the connected Ray, at most ``trials_at_once`` together."""
    settings.name = settings.name or f"spam-gpt-sweep-{time.strftime('%Y%m%d-%H%M%S')}"
    client = MlflowClient(settings.tracking_uri, registry_uri=settings.tracking_uri)
    tags = {SWEEP_TAG: "true"}
    settings.parent_run_id = open_run(client, settings.experiment, settings.name, params, tags)
    print(
        f"Sweep of {len(trials)} trials, {trials_at_once} at once; MLflow run "
        f"{settings.parent_run_id} in experiment {settings.experiment!r}",
        flush=True,
    )
    weights = {source: weights_for_workers(source) for source in {t.config.weights for t in trials}}
    trainable = tune.with_parameters(
        run_trial, settings=settings, inputs=inputs, plan=plan, weights=weights
    )
    grid = [
        {"number": t.number, "variant": t.variant, "seed": t.seed, "config": t.config.to_dict()}
        for t in trials
    ]
    lines = TrialLines(len(trials), sys.stdout)
    tuner = tune.Tuner(
        tune.with_resources(trainable, TRIAL_DRIVER_RESOURCES),
        param_space={"trial": tune.grid_search(grid)},
        tune_config=tune.TuneConfig(
            max_concurrent_trials=trials_at_once,
            trial_name_creator=trial_label,
            trial_dirname_creator=trial_label,
        ),
        run_config=tune.RunConfig(
            name=settings.name,
            storage_path=str(Path(settings.output, "ray").resolve()),
            verbose=0,
            callbacks=[lines],
        ),
    )
    try:
        with console.prints_into_log():
            results = tuner.fit()
    except (Exception, KeyboardInterrupt):
        client.set_terminated(settings.parent_run_id, status="FAILED")
        raise
    rows = []
    for result in results:
        trial = result.config["trial"]
        summary = lines.rows.get(trial["number"])
        error = None if summary else str(result.error or "no result").strip().splitlines()[-1]
        rows.append(summary if summary else failed_row(trial, error))
    return finish_sweep(client, settings, summary_frame(rows), register_as)


def finish_sweep(
    client: MlflowClient, settings: SweepSettings, frame: pd.DataFrame, register_as: str | None
) -> SweepResult:
    """Summary files into ``--output`` and the parent run; the best trial registered."""
    run_id = settings.parent_run_id
    for path in write_summary(frame, Path(settings.output)):
        client.log_artifact(run_id, str(path))
    best = best_trial(frame)
    version = None
    if best is not None:
        now = int(time.time() * 1000)
        client.log_batch(
            run_id,
            metrics=[
                Metric(f"best_{key}", float(best[key]), now, 0)
                for key in ("validation_accuracy", "test_accuracy", "macro_f1")
            ],
        )
        client.set_tag(
            run_id,
            "spam_gpt.best_trial",
            json.dumps(
                {"trial": int(best["trial"]), "variant": best["variant"], "run_id": best["run_id"]}
            ),
        )
        folder = Path(settings.trial_output(int(best["trial"])))
        metrics = json.loads((folder / "metrics.json").read_text())
        with console.prints_into_log():
            version = log_model_of_run(client, best["run_id"], folder, register_as, metrics)
    failed = bool((frame["error"] != "").any())
    client.set_terminated(run_id, status="FAILED" if failed and best is None else "FINISHED")
    return SweepResult(frame, best, version)


def describe(result: SweepResult, register_as: str | None) -> str:
    """The table and the verdict, as the sweep prints them at the end."""
    lines = [markdown_table(result.summary)]
    best = result.best
    if best is None:
        lines.append("No trial finished.")
        return "\n".join(lines)
    lines.append(
        f"Best: trial {best['trial']} ({best['variant']}, seed {best['seed']}): validation "
        f"accuracy {best['validation_accuracy']:.2%}, test accuracy {best['test_accuracy']:.2%}, "
        f"{int(best['trainable_parameters']):,} trainable parameters"
    )
    if result.registered_version:
        lines.append(f"Registered as {register_as} version {result.registered_version}")
    return "\n".join(lines)
