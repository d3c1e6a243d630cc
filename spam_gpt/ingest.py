"""Labelled messages streamed into Ray Train.

The driver keeps no rows: it scans the inputs with one Ray task per file (counts, labels,
lengths, skipped rows: :func:`spam_gpt.labelled.scan_source`), then hands the trainer lazy
Ray Datasets that read, filter, split and tokenize in Ray Data's ``map_batches``. Each
worker iterates its own shard: training rows split equally (DistributedDataParallel
needs the same number of steps on every worker), evaluation rows split so that every row
is counted exactly once. A few dozen rows per split, the same on every worker, feed the
loss and accuracy estimates.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import ray
import ray.data
import ray.train
from ray.train import DataConfig

from spam_gpt.config import TrainConfig
from spam_gpt.corpus import SPLIT_NAMES
from spam_gpt.dataset import Batch, SpamDataset, create_loader, make_batch
from spam_gpt.finetune import Loaders, Workers
from spam_gpt.labelled import (
    InMemory,
    LabelledInputs,
    Part,
    ScanStats,
    SplitPlan,
    encode_split,
    make_plan,
    scan_source,
)
from spam_gpt.sources import DataError, ParquetFooters, read_files

PROBES = ("train_probe", "validation_probe")
SHUFFLE_BUFFER_ROWS = 2048
# Rows per forward pass in the final evaluation: counts of right answers do not depend on
# how rows are grouped (except reading the last position of per-batch padding, below).
EVAL_BATCH_ROWS = 64


def scan_on_ray(inputs: LabelledInputs) -> ScanStats:
    """:func:`scan_source` as one Ray task per input, merged in input order."""
    scan = ray.remote(num_cpus=1)(scan_source)
    spec = inputs.spec
    refs = [
        scan.remote(source, columns, part.split, spec.split, spec.split_seed)
        for part, columns in zip(inputs.parts, inputs.columns)
        for source in part.sources
    ]
    stats = ScanStats()
    try:
        for ref in refs:
            stats.merge(ray.get(ref))
    except ray.exceptions.RayTaskError as error:  # say what was wrong, not where Ray was
        if isinstance(error.cause, DataError):
            raise error.cause from None
        raise
    return stats


def plan_on_ray(inputs: LabelledInputs) -> SplitPlan:
    return make_plan(inputs.spec, scan_on_ray(inputs), inputs.fixed_labels)


def part_footers(part: Part) -> ParquetFooters | None:
    """A Parquet part's footers, read once for all the splits it feeds."""
    if isinstance(part.sources[0], InMemory) or part.sources[0].format != "parquet":
        return None
    return ParquetFooters.of([source.path for source in part.sources])


def read_part(
    part: Part, footers: ParquetFooters | None, shuffle_seed: int | None
) -> ray.data.Dataset:
    if isinstance(part.sources[0], InMemory):
        return ray.data.from_arrow([source.table for source in part.sources])
    paths = [source.path for source in part.sources]
    return read_files(paths, part.sources[0].format, shuffle_seed, as_strings=True, footers=footers)


def split_dataset(
    inputs: LabelledInputs,
    plan: SplitPlan,
    split: str,
    footers: list[ParquetFooters | None],
    shuffle_seed: int | None = None,
) -> ray.data.Dataset:
    """The rows of one split, from every input that feeds it, encoded; ``footers``: those
    of each of ``inputs.parts``."""
    datasets = [
        read_part(part, part_footer, shuffle_seed).map_batches(
            encode_split,
            fn_kwargs={"columns": columns, "part_split": part.split, "plan": plan, "split": split},
            batch_format="pyarrow",
            batch_size=1024,
        )
        for part, columns, part_footer in zip(inputs.parts, inputs.columns, footers)
        if part.split in (None, split)
    ]
    return datasets[0].union(*datasets[1:]) if len(datasets) > 1 else datasets[0]


def training_datasets(
    inputs: LabelledInputs, plan: SplitPlan, cfg: TrainConfig
) -> dict[str, ray.data.Dataset]:
    """What the trainer gets: the splits, the training rows once more in order for the
    final train accuracy, and the rows the estimates read (taken here, a few dozen)."""
    quiet_data_context()
    footers = [part_footers(part) for part in inputs.parts]
    datasets = {
        "train": split_dataset(inputs, plan, "train", footers, shuffle_seed=cfg.seed),
        "train_full": split_dataset(inputs, plan, "train", footers),
        "validation": split_dataset(inputs, plan, "validation", footers),
        "test": split_dataset(inputs, plan, "test", footers),
    }
    probe_rows = cfg.eval_iter * cfg.batch_size
    for name, split in zip(PROBES, ("train", "validation")):
        rows = datasets[split].limit(probe_rows).take_all()
        datasets[name] = ray.data.from_items(rows)
    return datasets


def quiet_data_context() -> None:
    """No progress bars or plans from Ray Data in this process or, through the context
    Ray Train copies to them, in the workers: training reports its own progress."""
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False


class StreamSplitConfig(DataConfig):
    """Training rows split equally among workers, evaluation rows split with none
    dropped, the estimate rows given whole to every worker (each takes its share)."""

    def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
        output = [{} for _ in range(world_size)]
        for name, dataset in datasets.items():
            dataset = dataset.copy(dataset)
            dataset.context.execution_options = self._resolve_execution_options(name)
            if name in PROBES:
                for shard in output:
                    shard[name] = dataset.iterator()
                continue
            splits = dataset.streaming_split(
                world_size, equal=name == "train", locality_hints=worker_node_ids
            )
            for shard, split in zip(output, splits):
                shard[name] = split
        return output


class ShardLoader:
    """A worker's shard as :class:`Batch` es, truncated to ``max_length`` and padded (to it,
    or per batch). Every pass is one epoch; training passes reshuffle within a buffer."""

    def __init__(
        self,
        shard,
        batch_size: int,
        max_length: int,
        pad_to: int | None,
        pack: bool,
        *,
        train: bool = False,
        steps: int | None = None,
        seed: int = 0,
    ):
        self.shard = shard
        self.batch_size = batch_size
        self.max_length = max_length
        self.pad_to = pad_to
        self.pack = pack
        self.train = train
        self.steps = steps
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        if self.steps is None:
            raise TypeError("an evaluation stream does not know its length")
        return self.steps

    def __iter__(self) -> Iterator[Batch]:
        self.epoch += 1
        batches = self.shard.iter_batches(
            batch_size=self.batch_size,
            batch_format="pyarrow",
            drop_last=self.train,
            local_shuffle_buffer_size=SHUFFLE_BUFFER_ROWS if self.train else None,
            local_shuffle_seed=self.seed + self.epoch if self.train else None,
        )
        for table in batches:
            sequences = [ids[: self.max_length] for ids in table.column("input_ids").to_pylist()]
            yield make_batch(sequences, table.column("label").to_pylist(), self.pad_to, self.pack)


@dataclass
class StreamedData:
    """:class:`spam_gpt.finetune.TrainingData` read from this worker's dataset shards."""

    labels: list[str]
    longest_tokens: int
    train_rows: int

    def longest(self) -> int:
        return self.longest_tokens

    def loaders(self, cfg: TrainConfig, max_length: int, workers: Workers) -> Loaders:
        per_worker = cfg.batch_size // workers.world_size
        pad_to = max_length if cfg.padding == "fixed" else None
        steps = self.train_rows // workers.world_size // per_worker
        train = ShardLoader(
            ray.train.get_dataset_shard("train"),
            per_worker,
            max_length,
            pad_to,
            cfg.packs,
            train=True,
            steps=steps,
            seed=cfg.seed + 1000 * workers.rank,
        )
        probes = [
            create_loader(
                SpamDataset.from_rows(
                    list(ray.train.get_dataset_shard(name).iter_rows()), max_length
                ),
                cfg.batch_size,
                train=False,
                padding=cfg.padding,
                rank=workers.rank,
                world_size=workers.world_size,
                pack=cfg.packs,
            )
            for name in PROBES
        ]
        grouping_matters = cfg.token == "last" and cfg.padding == "batch"
        eval_batch = per_worker if grouping_matters else max(per_worker, EVAL_BATCH_ROWS)
        final = {
            split: ShardLoader(
                ray.train.get_dataset_shard("train_full" if split == "train" else split),
                eval_batch,
                max_length,
                pad_to,
                cfg.packs,
            )
            for split in SPLIT_NAMES
        }
        return Loaders(train, probes[0], probes[1], final)
