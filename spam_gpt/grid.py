"""The grid of a sweep: training options with lists of values, expanded into trials.

A grid names :class:`~spam_gpt.config.TrainConfig` options (``lr`` or ``--lr`` style
both work) with a list of values each; the trials are their cartesian product, in the
order written, and a ``seed`` list repeats every variant once per seed. Every trial's
configuration is built, and so checked, before any trial starts.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, fields
from pathlib import Path

import yaml

from spam_gpt.config import LORA, TrainConfig, resolve_config

BOOK = "book"
# The book's table after chapter 6: which layers train, which token is read, padding.
BOOK_GRID: dict[str, list] = {
    "trainable": ["last_layer", "last_block", "last_two_blocks", "all", LORA],
    "token": ["last", "last_real"],
    "padding": ["fixed", "batch"],
}
OPTION_TYPES = {f.name: f.type for f in fields(TrainConfig) if f.name != "preset"}


class GridError(ValueError):
    """A grid that cannot run; the message names the option or value to change."""


@dataclass(frozen=True)
class Trial:
    """One training run of a sweep: its variant (the grid's values but the seed)."""

    number: int
    variant: str
    seed: int
    config: TrainConfig


def load_grid(source: str) -> dict[str, list]:
    """``book``, or a YAML file mapping options to lists of values."""
    if source == BOOK:
        return dict(BOOK_GRID)
    path = Path(source)
    if not path.is_file():
        raise GridError(f"--grid {source}: no such file; give a YAML file or 'book'")
    try:
        grid = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise GridError(f"--grid {source} is not valid YAML: {error}") from None
    if not isinstance(grid, dict) or not grid:
        raise GridError(
            f"--grid {source} must map training options to lists of values, "
            "such as 'lr: [0.001, 0.0005]'"
        )
    return {option_name(str(key), source): values for key, values in grid.items()}


def option_name(key: str, source: str) -> str:
    name = key.removeprefix("--").replace("-", "_")
    if name not in OPTION_TYPES:
        known = ", ".join(sorted(OPTION_TYPES))
        hint = " (give it with --preset)" if name == "preset" else f"; known options: {known}"
        raise GridError(f"--grid {source}: {key!r} is not a training option{hint}")
    return name


def option_values(name: str, values) -> list:
    """The option's values as its type: YAML reads ``1e-3`` as text, for example."""
    values = values if isinstance(values, list) else [values]
    if not values:
        raise GridError(f"grid option {name!r} has an empty list; give it at least one value")
    kind = OPTION_TYPES[name]
    return [typed_value(name, kind, value) for value in values]


def typed_value(name: str, kind: str, value):
    if kind == "str":
        if isinstance(value, (dict, list)) or value is None:
            raise GridError(f"grid option {name!r}: {value!r} is not a single value")
        return str(value)
    number, noun = {"int": (int, "an integer"), "float": (float, "a number")}[kind]
    try:
        if isinstance(value, bool) or (kind == "int" and isinstance(value, float)):
            raise ValueError
        return number(value)
    except (TypeError, ValueError):
        raise GridError(f"grid option {name!r}: {value!r} is not {noun}") from None


def expand_grid(grid: dict[str, list], preset: str, overrides: dict | None = None) -> list[Trial]:
    """Every trial of ``grid`` on top of ``preset`` and the command's own ``overrides``."""
    typed = {name: option_values(name, values) for name, values in grid.items()}
    seeds = typed.pop("seed", None)
    base = {k: v for k, v in (overrides or {}).items() if v is not None}
    names = list(typed)
    trials = []
    for combination in itertools.product(*typed.values()):
        chosen = dict(zip(names, combination))
        variant = " ".join(f"{k}={v}" for k, v in chosen.items()) or "base"
        for seed in seeds or [resolve_config(preset, base).seed]:
            try:
                config = resolve_config(preset, {**base, **chosen, "seed": seed})
            except ValueError as error:
                raise GridError(f"grid variant {variant}: {error}") from None
            trials.append(Trial(len(trials) + 1, variant, seed, config))
    return trials
