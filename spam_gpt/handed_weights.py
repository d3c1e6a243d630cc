"""Pretrained weights resolved once, on the driver, and handed to every Ray Train worker.

If each worker resolved ``--weights gpt2-xl`` itself, a cluster would download 6 GB once
per worker (and race on one cache). The driver resolves it instead. Workers that can see
the driver's folder (on the driver's node, or through a cache on a shared filesystem)
read it in place; on a cluster of several nodes the driver also puts the files into Ray's
object store once, and a worker that cannot see the folder copies them to a local
temporary folder, once per node.
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import ray

from spam_gpt.weights import is_weights_folder, resolve_weights

NODE_FOLDER = "spam-gpt-weights"


@dataclass(frozen=True)
class HandedWeights:
    """The driver's weights folder, and its files in the object store when shared."""

    folder: str
    files: dict[str, ray.ObjectRef] | None = None


def hand_over(source: str, share: bool) -> HandedWeights:
    """Resolve ``source`` here; with ``share``, put its files into the object store
    (memory-mapped, so the driver never holds a whole checkpoint in its own memory)."""
    folder = resolve_weights(source)
    files = None
    if share:
        files = {
            path.name: ray.put(np.memmap(path, dtype=np.uint8, mode="r"))
            for path in sorted(folder.iterdir())
            if path.is_file()
        }
    return HandedWeights(str(folder), files)


def cluster_has_other_nodes() -> bool:
    return sum(1 for node in ray.nodes() if node["Alive"]) > 1


def local_weights(handed: HandedWeights) -> Path:
    """A folder on this node holding the handed weights."""
    folder = Path(handed.folder)
    if is_weights_folder(folder) or not handed.files:
        return folder
    key = hashlib.sha256(handed.folder.encode()).hexdigest()[:16]
    target = Path(tempfile.gettempdir()) / NODE_FOLDER / key
    if is_weights_folder(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent))
    for name, ref in handed.files.items():
        with open(staging / name, "wb") as out:
            out.write(memoryview(ray.get(ref)))
    try:
        staging.rename(target)  # atomic: a worker beside this one may have won the race
    except OSError:
        shutil.rmtree(staging)
    return target
