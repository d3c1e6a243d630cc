"""``spam-gpt sweep``: a grid of training runs on Ray Tune, each trial a Ray Train run.

The driver scans the data and resolves the weights once, opens the sweep's parent MLflow
run and hands Tune one function per trial. That function opens the trial's child run and
fits a ``TorchTrainer`` exactly as ``spam-gpt train --workers`` does (Tune's own
``TuneReportCallback`` forwards its epoch reports), then reports the trial's summary row.
At the end the parent run holds the summary table and plot; the best trial (validation
accuracy, ties to fewer trainable parameters) gets its model logged in its child run, and
registered when asked. Every trial's checkpoint stays in ``OUTPUT/trials/NN/model``.

A sweep stopped part way (Ctrl-C, SIGTERM, a lost driver) continues with ``--resume
OUTPUT``: ``OUTPUT/sweep.json`` holds its trials and settings, each finished trial its
summary row, and an unfinished trial continues its Ray Train run (and child MLflow run)
from its last epoch checkpoint, as ``spam-gpt train --resume`` does.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TextIO

import pandas as pd
from mlflow import MlflowClient
from mlflow.entities import Metric
from mlflow.exceptions import MlflowException
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback

from spam_gpt import console
from spam_gpt.config import TrainConfig
from spam_gpt.distributed import JOB_FILE, TrainJob, new_job, run_job, weights_for_workers
from spam_gpt.finetune import METRICS_FILE
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
from spam_gpt.tracking import (
    PARENT_TAG,
    best_effort,
    log_model_of_run,
    open_run,
    reason_of,
)

SWEEP_TAG = "spam_gpt.sweep"
# A trial's function only waits on its Ray Train run, whose workers (and Ray Data) hold the
# CPUs; Tune needs some resource per trial, so it reserves memory rather than a CPU.
TRIAL_DRIVER_RESOURCES = {"CPU": 0, "memory": 256 * 2**20}
SWEEP_FILE = "sweep.json"
ROW_FILE = "summary.json"  # a finished trial's row, in its folder


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

    def trial_name(self, number: int) -> str:
        return f"{self.name}-trial-{number:02d}"


@dataclass
class SavedSweep:
    """What ``--resume`` needs to continue a sweep: its settings and every trial."""

    settings: dict  # SweepSettings fields
    trials: list[dict]  # number, variant, seed and config of each trial
    trials_at_once: int
    register_as: str | None
    checksum: str  # the data's, as its split plan computed it
    finished: bool = False

    def save(self) -> None:
        folder = Path(self.settings["output"])
        folder.mkdir(parents=True, exist_ok=True)
        (folder / SWEEP_FILE).write_text(json.dumps(asdict(self), indent=2) + "\n")

    def finished_rows(self) -> dict[int, dict]:
        """The summary rows of this sweep's trials that finished (a stale folder of an
        earlier sweep in the same --output does not count)."""
        settings = SweepSettings(**self.settings)
        rows = {}
        for trial in self.trials:
            path = Path(settings.trial_output(trial["number"])) / ROW_FILE
            if path.is_file():
                saved = json.loads(path.read_text())
                if saved["trial_name"] == settings.trial_name(trial["number"]):
                    rows[trial["number"]] = saved["row"]
        return rows


def load_sweep(folder: str) -> SavedSweep:
    path = Path(folder) / SWEEP_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"--resume {folder}: no {SWEEP_FILE} there; pass a sweep's --output"
        )
    return SavedSweep(**json.loads(path.read_text()))


def refuse_unfinished(folder: str) -> None:
    """A new sweep would overwrite the trials of an unfinished one in ``folder``."""
    path = Path(folder) / SWEEP_FILE
    if path.is_file() and not json.loads(path.read_text()).get("finished"):
        raise ValueError(
            f"--output {folder} holds a sweep that did not finish: continue it with "
            f"`spam-gpt sweep --resume {folder}`, or pass another --output"
        )


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
    job = started_job(settings, trial["number"]) or new_job(
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
        name=settings.trial_name(trial["number"]),
        parent_run_id=settings.parent_run_id,
        log_model=False,  # every trial's model stays in its folder; the best is logged
    )
    metrics = run_job(
        job, inputs, plan, weights[cfg.weights], show_epochs=False, callbacks=[TuneReportCallback()]
    )
    row = summary_row(trial, job.run_id, metrics)
    saved = {"trial_name": job.ray_name, "row": row}
    (Path(job.output) / ROW_FILE).write_text(json.dumps(saved, indent=2) + "\n")
    tune.report({"summary": row})


def started_job(settings: SweepSettings, number: int) -> TrainJob | None:
    """This sweep's job for trial ``number`` if it started before (a resumed sweep): its
    Ray Train run continues from its last checkpoint, in the same child MLflow run."""
    path = Path(settings.trial_output(number)) / JOB_FILE
    if not path.is_file():
        return None
    job = TrainJob(**json.loads(path.read_text()))
    return job if job.ray_name == settings.trial_name(number) else None


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
    grid = [
        {"number": t.number, "variant": t.variant, "seed": t.seed, "config": t.config.to_dict()}
        for t in trials
    ]
    saved = SavedSweep(asdict(settings), grid, trials_at_once, register_as, plan.checksum)
    saved.save()
    print(
        f"Sweep of {len(trials)} trials, {trials_at_once} at once; MLflow run "
        f"{settings.parent_run_id} in experiment {settings.experiment!r}",
        flush=True,
    )
    return run_trials(saved, inputs, plan, {}, tune_name=settings.name)


def resume_sweep(saved: SavedSweep, inputs: LabelledInputs, plan: SplitPlan) -> SweepResult:
    """Run the trials of a stopped sweep that did not finish, in its parent run."""
    if plan.checksum != saved.checksum:
        raise ValueError(
            f"the data of the sweep in {saved.settings['output']} changed since it started "
            "(its checksum differs): start a new sweep with another --output"
        )
    settings = SweepSettings(**saved.settings)
    done = saved.finished_rows()
    client = MlflowClient(settings.tracking_uri, registry_uri=settings.tracking_uri)
    client.update_run(settings.parent_run_id, status="RUNNING")
    close_finished_trials(client, done)
    left = len(saved.trials) - len(done)
    print(
        f"Sweep {settings.name}: {len(done)} of {len(saved.trials)} trials finished before; "
        f"running the other {left}, {min(saved.trials_at_once, left)} at once; MLflow run "
        f"{settings.parent_run_id}",
        flush=True,
    )
    return run_trials(
        saved, inputs, plan, done, tune_name=f"{settings.name}-{time.strftime('%H%M%S')}"
    )


def close_finished_trials(client: MlflowClient, done: dict[int, dict]) -> None:
    """Mark the runs of finished trials FINISHED: a trial that finished as the sweep
    stopped can end its run just before the stop marks the running trials failed."""
    for row in done.values():
        if client.get_run(row["run_id"]).info.status != "FINISHED":
            with console.prints_into_log():  # MLflow's line on ending a run
                client.set_terminated(row["run_id"], status="FINISHED")


def run_trials(
    saved: SavedSweep,
    inputs: LabelledInputs,
    plan: SplitPlan,
    done: dict[int, dict],
    *,
    tune_name: str,
) -> SweepResult:
    """The sweep's trials but those ``done`` (their rows), on Ray Tune; then its summary.

    Ctrl-C raises at once here, as SIGTERM does: Tune's own handler would stop gracefully
    and return as if the sweep were over, to be summarised and registered half done."""
    settings = SweepSettings(**saved.settings)
    client = MlflowClient(settings.tracking_uri, registry_uri=settings.tracking_uri)
    sources = {trial["config"]["weights"] for trial in saved.trials}
    weights = {source: weights_for_workers(source) for source in sources}
    trainable = tune.with_parameters(
        run_trial, settings=settings, inputs=inputs, plan=plan, weights=weights
    )
    pending = [trial for trial in saved.trials if trial["number"] not in done]
    lines = TrialLines(len(saved.trials), sys.stdout)
    tuner = tune.Tuner(
        tune.with_resources(trainable, TRIAL_DRIVER_RESOURCES),
        param_space={"trial": tune.grid_search(pending)},
        tune_config=tune.TuneConfig(
            max_concurrent_trials=saved.trials_at_once,
            trial_name_creator=trial_label,
            trial_dirname_creator=trial_label,
        ),
        run_config=tune.RunConfig(
            name=tune_name,
            storage_path=str(Path(settings.output, "ray").resolve()),
            verbose=0,
            callbacks=[lines],
        ),
    )
    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
    try:
        with console.prints_into_log():
            results = tuner.fit() if pending else []
    except (Exception, KeyboardInterrupt):
        with best_effort():  # MLflow may be the fault
            end_runs(client, settings.parent_run_id)
        raise
    rows = dict(done)
    for result in results:
        trial = result.config["trial"]
        summary = lines.rows.get(trial["number"])
        error = None if summary else str(result.error or "no result").strip().splitlines()[-1]
        rows[trial["number"]] = summary if summary else failed_row(trial, error)
    outcome = finish_sweep(client, settings, summary_frame(list(rows.values())), saved.register_as)
    saved.finished = True
    saved.save()
    return outcome


def end_runs(client: MlflowClient, parent_run_id: str) -> None:
    """Mark the sweep's run and its running trials' runs failed: their processes end with
    this one, and nothing else would close the runs."""
    experiment = client.get_run(parent_run_id).info.experiment_id
    children = client.search_runs(
        [experiment], f"tags.`{PARENT_TAG}` = '{parent_run_id}' and attributes.status = 'RUNNING'"
    )
    for run in children:
        client.set_terminated(run.info.run_id, status="FAILED")
    client.set_terminated(parent_run_id, status="FAILED")


def stopped_message(output: str) -> str:
    """What a stopped sweep says: how far it got and how to continue it."""
    saved = load_sweep(output)
    done = saved.finished_rows()
    return (
        f"spam-gpt sweep: stopped with {len(done)} of {len(saved.trials)} trials finished; "
        f"continue it with `spam-gpt sweep --resume {output}`"
    )


def finish_sweep(
    client: MlflowClient, settings: SweepSettings, frame: pd.DataFrame, register_as: str | None
) -> SweepResult:
    """Summary files into ``--output`` and the parent run; the best trial registered. Where
    MLflow does not answer, the sweep stays unfinished for ``--resume`` to finish."""
    try:
        return log_sweep(client, settings, frame, register_as)
    except MlflowException as error:
        raise ValueError(
            f"the trials are in {Path(settings.output) / 'trials'}, but MLflow at "
            f"{settings.tracking_uri} did not take the sweep's summary ({reason_of(error)}): "
            f"once it answers, `spam-gpt sweep --resume {settings.output}` finishes it"
        ) from None


def log_sweep(
    client: MlflowClient, settings: SweepSettings, frame: pd.DataFrame, register_as: str | None
) -> SweepResult:
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
        metrics = json.loads((folder / METRICS_FILE).read_text())
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
