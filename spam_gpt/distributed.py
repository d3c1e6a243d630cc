"""Fine-tuning as a Ray Train job: the per-worker function, the scaling and run configs,
and the driver that opens the MLflow run, starts the trainer and collects the outputs.

Every worker runs the same :func:`spam_gpt.finetune.finetune` on its shard of the data,
streamed through Ray Data (:mod:`spam_gpt.ingest`); gradients meet in
DistributedDataParallel (gloo on CPU, NCCL on GPU) and losses and accuracies are summed
over all workers before anyone reports them. Rank 0 checkpoints every epoch and is the
only worker that writes to MLflow.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from ray.train import (
    Checkpoint,
    CheckpointConfig,
    FailureConfig,
    LoggingConfig,
    RunConfig,
    ScalingConfig,
)
from ray.train.torch import TorchTrainer
from ray.train.v2.api.callback import UserCallback

from spam_gpt.config import RANDOM_WEIGHTS, TrainConfig
from spam_gpt.console import EpochRelay, prints_into_log
from spam_gpt.corpus import SPLIT_NAMES
from spam_gpt.finetune import METRICS_FILE, Workers, finetune, write_outputs
from spam_gpt.handed_weights import (
    HandedWeights,
    cluster_has_other_nodes,
    hand_over,
    local_weights,
)
from spam_gpt.ingest import StreamedData, StreamSplitConfig, plan_on_ray, training_datasets
from spam_gpt.labelled import DataSpec, LabelledInputs, SplitPlan, labelled_inputs
from spam_gpt.ray_cluster import connect, require_cpus, require_gpus
from spam_gpt.tracking import (
    RunLogger,
    best_effort,
    git_commit,
    job_of_run,
    job_tags,
    open_run,
    reason_of,
)
from spam_gpt.training import TrainingHistory, say
from spam_gpt.training_state import load_training_state, save_training_state

JOB_FILE = "job.json"
# Said after an epoch's line while MLflow does not answer.
UNANSWERED = " (MLflow does not answer: its metrics wait, training goes on)"
# The latest checkpoint (to resume from, always kept) and the best epoch's.
KEPT_CHECKPOINTS = CheckpointConfig(num_to_keep=2, checkpoint_score_attribute="val_accuracy")
# Ray Train's controller looks at its workers every 2 s by default and learns of their
# reports and their end only then: a one-step job took about 3 s longer than at 0.5 s
# (benchmarks/RESULTS.md). Each look is one remote call per worker. Ray hands the driver's
# value to the controller; a value the user set wins.
CONTROLLER_POLL = ("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")


@dataclass
class TrainJob:
    """Everything a training job needs, saved so that ``--resume`` can rebuild it."""

    config: dict
    output: str
    workers: int = 1
    cpus_per_worker: int = 1
    gpu: bool = False
    tracking_uri: str = ""
    experiment: str = "spam-gpt"
    register_as: str | None = "spam-gpt"
    max_failures: int = 3
    storage_path: str = ""
    ray_name: str = ""
    run_id: str = ""
    data: dict | None = None  # DataSpec fields; None: the chapter's bundled splits
    params: dict = field(default_factory=dict)
    log_model: bool = True  # a sweep logs only its best trial's model

    def data_spec(self) -> DataSpec | None:
        return None if self.data is None else DataSpec(**self.data)

    def save(self) -> None:
        Path(self.output).mkdir(parents=True, exist_ok=True)
        (Path(self.output) / JOB_FILE).write_text(json.dumps(asdict(self), indent=2) + "\n")


def all_reduce_sum(device: torch.device):
    """Sum a small tensor over all workers (on the device NCCL needs, back on the CPU)."""

    def reduce(tensor: torch.Tensor) -> torch.Tensor:
        summed = tensor.to(device, copy=True)
        dist.all_reduce(summed, op=dist.ReduceOp.SUM)
        return summed.cpu()

    return reduce


def report_epoch(history: TrainingHistory, snapshot, rank: int) -> None:
    """Every worker reports; rank 0 attaches the state to resume from."""
    metrics = {
        "epoch": history.epochs_done,
        "train_accuracy": history.train_accs[-1],
        "val_accuracy": history.val_accs[-1],
        "examples_seen": history.examples_seen,
    }
    with tempfile.TemporaryDirectory() as folder:
        checkpoint = None
        if rank == 0:
            save_training_state(snapshot(), Path(folder))
            checkpoint = Checkpoint.from_directory(folder)
        ray.train.report(metrics, checkpoint=checkpoint)


def epoch_line(history: TrainingHistory, epochs: int) -> str:
    """One line a person reads per epoch of a Ray Train job."""
    losses = ""
    if history.train_losses:
        train, val = history.train_losses[-1], history.val_losses[-1]
        losses = f"train loss {train:.3f}, val loss {val:.3f}; "
    stopped = " (stopped at --max-steps)" if history.stopped_at_max_steps else ""
    return (
        f"Epoch {history.epochs_done}/{epochs}: {losses}training accuracy "
        f"{history.train_accs[-1]:.2%}, validation accuracy {history.val_accs[-1]:.2%}{stopped}"
    )


def train_worker(loop_config: dict) -> None:
    """The training function each Ray Train worker runs."""
    job = TrainJob(**loop_config["job"])
    data = StreamedData(**loop_config["data"])
    cfg = TrainConfig(**job.config)
    if loop_config["weights"] is not None:
        cfg = dataclasses.replace(cfg, weights=str(local_weights(loop_config["weights"])))
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    torch.set_num_threads(job.cpus_per_worker)
    device = ray.train.torch.get_device()
    logger = RunLogger(job.tracking_uri, job.run_id) if rank == 0 and job.run_id else None

    resume = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None and report_again_if_final(checkpoint, rank):
        return
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            resume = load_training_state(Path(folder))
        if rank == 0:
            say(f"Resuming after epoch {resume.history.epochs_done}")
        if logger:
            logger.note_resume(resume.history.epochs_done)
            logger.keep_up(resume.history)

    relay = loop_config.get("relay") if rank == 0 else None

    def on_eval(history) -> None:
        if not logger.unanswered:  # an unanswering server is tried again at the epoch's end
            logger.keep_up(history)

    def on_epoch_end(history, snapshot) -> None:
        report_epoch(history, snapshot, rank)
        if logger:
            logger.keep_up(history)
        if relay is not None:
            unanswered = logger is not None and logger.unanswered
            relay.put(epoch_line(history, cfg.epochs) + (UNANSWERED if unanswered else ""))

    workers = Workers(
        rank=rank,
        world_size=world_size,
        device=device,
        reduce=all_reduce_sum(device),
        wrap=ray.train.torch.prepare_model,
    )
    result = finetune(
        cfg,
        data,
        workers,
        resume=resume,
        on_eval=on_eval if logger else None,
        on_epoch_end=on_epoch_end,
        verbose=rank == 0,
    )
    with tempfile.TemporaryDirectory() as folder:
        final = None
        if rank == 0:
            write_outputs(result, folder)
            final = Checkpoint.from_directory(folder)
        ray.train.report(final_report(result.metrics, result.history.val_accs), checkpoint=final)


def final_report(metrics: dict, val_accs: list[float]) -> dict:
    """The last report of a run: its final metrics, its checkpoint scored by the kept
    epoch's validation accuracy as the epochs' checkpoints are."""
    scores = {k: v for k, v in metrics.items() if isinstance(v, float)}
    return {"final": True, "val_accuracy": val_accs[metrics["kept_epoch"] - 1], **scores}


def report_again_if_final(checkpoint: Checkpoint, rank: int) -> bool:
    """Whether ``checkpoint`` is a run's final one (outputs, no training state), reported
    again here. A job stopped after training ended but before the driver took the outputs
    (a sweep stopped at that moment, a driver lost) restarts from it: nothing is left to
    train, and the outputs must reach the driver once more."""
    with checkpoint.as_directory() as folder:
        metrics_file = Path(folder) / METRICS_FILE
        if not metrics_file.is_file():
            return False
        metrics = json.loads(metrics_file.read_text())
    report = final_report(metrics, metrics["history"]["val_accs"])
    ray.train.report(report, checkpoint=checkpoint if rank == 0 else None)
    return True


def new_job(
    cfg: TrainConfig,
    plan: SplitPlan,
    *,
    output: str,
    workers: int,
    cpus_per_worker: int,
    gpu: bool,
    tracking_uri: str,
    experiment: str,
    register_as: str | None,
    max_failures: int,
    storage_path: str | None,
    data: DataSpec | None,
    name: str | None = None,
    parent_run_id: str | None = None,
    log_model: bool = True,
) -> TrainJob:
    """Describe a fresh job and open its MLflow run (a child of ``parent_run_id``, for a
    sweep's trial)."""
    output = str(Path(output).resolve())
    job = TrainJob(
        config=cfg.to_dict(),
        output=output,
        workers=workers,
        cpus_per_worker=cpus_per_worker,
        gpu=gpu,
        tracking_uri=tracking_uri,
        experiment=experiment,
        register_as=register_as,
        max_failures=max_failures,
        storage_path=storage_path or str(Path(output) / "ray"),
        ray_name=name or f"spam-gpt-{time.strftime('%Y%m%d-%H%M%S')}",
        data=None if data is None else asdict(data),
        log_model=log_model,
    )
    job.params = {
        **job.config,
        "workers": workers,
        "cpus_per_worker": cpus_per_worker,
        "gpu": gpu,
        **data_params(data, plan),
        "git_commit": git_commit(),
    }
    client = MlflowClient(tracking_uri)
    job_tag = {k: v for k, v in asdict(job).items() if k != "params"}
    tags = job_tags(job_tag, parent_run_id)
    job.run_id = open_run(client, experiment, job.ray_name, job.params, tags)
    job.save()
    return job


def data_params(spec: DataSpec | None, plan: SplitPlan) -> dict:
    """What the run trained on, as MLflow parameters."""
    params = {
        "data": "the chapter's splits" if spec is None else " ".join(spec.paths),
        "labels": ",".join(plan.labels),
        "dataset_checksum": plan.checksum,
        "skipped_rows": plan.skipped,
        **{f"{split}_rows": plan.split_rows(split) for split in SPLIT_NAMES},
    }
    if spec is not None:
        params |= {
            key: value
            for key, value in asdict(spec).items()
            if key != "paths" and value is not None
        }
    return params


def find_job(reference: str, tracking_uri: str) -> TrainJob:
    """The job behind ``--resume``: an output folder, or an MLflow run id."""
    folder = Path(reference)
    if (folder / JOB_FILE).is_file():
        return TrainJob(**json.loads((folder / JOB_FILE).read_text()))
    if folder.exists():
        raise FileNotFoundError(
            f"{folder} has no {JOB_FILE}; pass the --output of a `--workers` job"
        )
    try:
        fields = job_of_run(MlflowClient(tracking_uri), reference)
    except MlflowException as error:
        raise ValueError(
            f"--resume {reference}: not an output folder, nor a run in {tracking_uri} "
            f"({error.message}); pass --tracking-uri if the run lives elsewhere"
        ) from None
    return TrainJob(**{**fields, "run_id": reference})


def refuse_finished(job: TrainJob) -> None:
    """A finished job whose outputs are in place has nothing to resume (a job that
    finished after its driver was lost does: its outputs come over once more)."""
    status = MlflowClient(job.tracking_uri).get_run(job.run_id).info.status
    if status == "FINISHED" and (Path(job.output) / METRICS_FILE).is_file():
        raise ValueError(
            f"the job in {job.output} finished: its model is in {Path(job.output) / 'model'}; "
            "start a new one with --output elsewhere"
        )


def weights_for_workers(source: str) -> HandedWeights | None:
    """Resolve (and download) pretrained weights here, once for all workers."""
    if source == RANDOM_WEIGHTS:
        return None
    return hand_over(source, share=cluster_has_other_nodes())


def run_job(
    job: TrainJob,
    inputs: LabelledInputs,
    plan: SplitPlan,
    weights: HandedWeights | None,
    *,
    show_epochs: bool = True,
    callbacks: Sequence[UserCallback] = (),
) -> dict:
    """Run (or continue) ``job`` on the connected Ray; copy its outputs to ``job.output``.
    ``weights``: what :func:`weights_for_workers` resolved for the job's ``--weights``;
    ``show_epochs`` prints rank 0's epoch lines here (Ray forwards no worker output when
    quiet); ``callbacks`` see every report (a sweep's trial passes Tune's)."""
    client = MlflowClient(job.tracking_uri)
    client.update_run(job.run_id, status="RUNNING")
    cfg = TrainConfig(**job.config)
    data = StreamedData(plan.labels, plan.longest, plan.split_rows("train"))
    relay = EpochRelay(cfg.epochs) if show_epochs else None
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={
            "job": asdict(job),
            "data": asdict(data),
            "weights": weights,
            "relay": relay.queue if relay else None,
        },
        datasets=training_datasets(inputs, plan, cfg),
        dataset_config=StreamSplitConfig(),
        scaling_config=ScalingConfig(
            num_workers=job.workers,
            use_gpu=job.gpu,
            resources_per_worker={"CPU": job.cpus_per_worker, **({"GPU": 1} if job.gpu else {})},
        ),
        run_config=RunConfig(
            name=job.ray_name,
            storage_path=job.storage_path,
            failure_config=FailureConfig(max_failures=job.max_failures),
            checkpoint_config=KEPT_CHECKPOINTS,
            worker_runtime_env={"env_vars": forwarded_env()},
            logging_config=LoggingConfig(log_level="WARNING"),
            callbacks=list(callbacks),
        ),
    )
    os.environ.setdefault(*CONTROLLER_POLL)
    try:
        with relay or nullcontext():
            result = trainer.fit()
    except (Exception, KeyboardInterrupt):
        with best_effort():  # MLflow may be the fault
            client.set_terminated(job.run_id, status="FAILED")
        raise
    with result.checkpoint.as_directory() as folder:
        shutil.copytree(folder, job.output, dirs_exist_ok=True)
        metrics = json.loads((Path(folder) / METRICS_FILE).read_text())
        log_outputs(job, metrics, Path(folder))
    return metrics


class ResultsNotLogged(ValueError):
    """Training finished and its outputs are saved, but MLflow did not take them."""


def log_outputs(job: TrainJob, metrics: dict, folder: Path) -> None:
    """The finished job's results, plots and model into its run, from the driver, which
    holds them by now: where MLflow does not answer, nothing trained is lost, and
    ``--resume`` logs them once it does."""
    try:
        with prints_into_log():  # MLflow's own lines on registering and ending the run
            logger = RunLogger(job.tracking_uri, job.run_id)
            logger.log_results(metrics, folder, job.register_as, job.log_model)
            logger.client.set_terminated(job.run_id, status="FINISHED")
    except MlflowException as error:
        raise ResultsNotLogged(
            f"training finished and its model is in {Path(job.output) / 'model'}, but MLflow at "
            f"{job.tracking_uri} did not take the results ({reason_of(error)}): once it "
            f"answers, `spam-gpt train --resume {job.output}` logs them"
        ) from None


def connect_for_training(
    address: str | None,
    workers: int,
    cpus_per_worker: int,
    runtime_env: dict | None = None,
    gpu: bool = False,
) -> None:
    """Join (or start) Ray with a CPU beyond the workers' for Ray Data, which reads and
    tokenizes while they train: without it the stream, and training, would wait forever."""
    needed = workers * cpus_per_worker + 1
    connect(address, num_cpus=needed, runtime_env=runtime_env)
    require_cpus(needed, "--workers x --cpus-per-worker plus one CPU for Ray Data")
    if gpu:
        require_gpus(workers, "worker")


def prepare_data(spec: DataSpec | None) -> tuple[LabelledInputs, SplitPlan]:
    """Find the inputs and scan them on the connected Ray (one task per file)."""
    inputs = labelled_inputs(spec)
    return inputs, plan_on_ray(inputs)


def forwarded_env() -> dict[str, str]:
    """Settings the workers must share with the driver (Hugging Face cache, offline mode)."""
    names = ("HF_HOME", "HF_HUB_CACHE", "HF_HUB_OFFLINE", "HF_ENDPOINT")
    return {name: os.environ[name] for name in names if name in os.environ}
