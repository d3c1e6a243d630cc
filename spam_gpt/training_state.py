"""What a stopped or failed training run needs to continue exactly where it was.

Saved after every epoch: the classifier and optimizer tensors, and for ``--keep best`` the
best epoch's weights (``torch.save``, read back with ``weights_only=True`` so no code is
unpickled), the RNG state that decides the next shuffle, and the history as JSON.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from spam_gpt.training import TrainingHistory

STATE_FILE = "training_state.pt"
HISTORY_FILE = "history.json"


@dataclass
class TrainingState:
    model: dict
    optimizer: dict
    rng: torch.Tensor
    history: TrainingHistory
    best: dict | None = None  # --keep best: the best epoch's weights so far


def save_training_state(state: TrainingState, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {"model": state.model, "optimizer": state.optimizer, "rng": state.rng}
    if state.best is not None:
        tensors["best"] = state.best
    torch.save(tensors, folder / STATE_FILE)
    (folder / HISTORY_FILE).write_text(json.dumps(asdict(state.history)))


def load_training_state(folder: Path) -> TrainingState:
    tensors = torch.load(folder / STATE_FILE, map_location="cpu", weights_only=True)
    history = TrainingHistory(**json.loads((folder / HISTORY_FILE).read_text()))
    return TrainingState(
        tensors["model"], tensors["optimizer"], tensors["rng"], history, tensors.get("best")
    )
