"""``ray_config.yaml``: the one settings file the three jobs read.

Its sections hold defaults for ``spam-gpt`` options: ``common`` for every command that has
the option, then one section per command. Keys are the commands' own option names
(``tracking_uri`` for ``--tracking-uri``), so the file and the command line cannot drift
apart, and an unknown or ill-typed key is an error that names it.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import yaml

SETTINGS_FILE = "ray_config.yaml"
SETTINGS_ENV = "SPAM_GPT_CONFIG"
JOB_COMMANDS = ("train", "sweep", "score", "serve")


class SettingsError(ValueError):
    """The settings file names an option that does not exist or gives it a wrong type."""


def settings_path(explicit: str | None = None) -> Path | None:
    """``explicit``, else ``$SPAM_GPT_CONFIG``, else ``./ray_config.yaml`` if present."""
    chosen = explicit or os.environ.get(SETTINGS_ENV)
    if chosen:
        if not Path(chosen).is_file():
            raise SettingsError(f"settings file {chosen} does not exist")
        return Path(chosen)
    default = Path(SETTINGS_FILE)
    return default if default.is_file() else None


def load_settings(path: Path) -> dict:
    try:
        settings = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise SettingsError(f"{path} is not valid YAML: {error}") from None
    if not isinstance(settings, dict):
        raise SettingsError(f"{path} must be a mapping of sections")
    unknown = set(settings) - {"common", *JOB_COMMANDS}
    if unknown:
        raise SettingsError(
            f"{path}: unknown section(s) {', '.join(sorted(unknown))}; "
            f"use common, {', '.join(JOB_COMMANDS)}"
        )
    return settings


def option_actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {action.dest: action for action in parser._actions if action.option_strings}


def check_value(where: str, action: argparse.Action, value: object) -> None:
    """Refuse a value whose YAML type cannot be what the option takes."""
    if isinstance(action, argparse._StoreTrueAction):
        ok = isinstance(value, bool)
        expected = "true or false"
    elif action.nargs == "+":
        ok = isinstance(value, str) or (
            isinstance(value, list) and bool(value) and all(isinstance(v, str) for v in value)
        )
        expected = "a string or a list of strings"
    elif getattr(action.type, "__name__", "") == "json_object":
        ok = isinstance(value, dict)
        expected = "a mapping"
    elif action.type in (int, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        ok = ok and (action.type is float or isinstance(value, int))
        expected = "an integer" if action.type is int else "a number"
    else:
        ok = isinstance(value, str)
        expected = "a string"
    if ok and action.choices is not None and value not in action.choices:
        ok, expected = False, f"one of {', '.join(map(str, action.choices))}"
    if not ok:
        raise SettingsError(f"{where}: expected {expected}, got {value!r}")


def settings_arguments(
    command: str, settings: dict, parsers: dict[str, argparse.ArgumentParser], origin: str
) -> list[str]:
    """Command-line arguments equal to the file's defaults for ``command``.

    They go before the user's own arguments, which therefore win.
    """
    common = settings.get("common") or {}
    for key in common:
        if not any(key in option_actions(parsers[c]) for c in JOB_COMMANDS if c in parsers):
            raise SettingsError(f"{origin}: common.{key} is not an option of any job")
    section = settings.get(command) or {}
    actions = option_actions(parsers[command])
    for key in section:
        if key not in actions:
            known = ", ".join(sorted(k for k in actions if k != "help"))
            raise SettingsError(
                f"{origin}: {command}.{key} is not a `spam-gpt {command}` option (known: {known})"
            )
    arguments: list[str] = []
    merged = {k: v for k, v in common.items() if k in actions} | section
    for key, value in merged.items():
        if value is None:
            continue
        label = f"{origin}: {command if key in section else 'common'}.{key}"
        action = actions[key]
        check_value(label, action, value)
        if isinstance(action, argparse._StoreTrueAction):
            arguments += [action.option_strings[0]] if value else []
        elif isinstance(value, dict):
            arguments += [action.option_strings[0], json.dumps(value)]
        elif isinstance(value, list):
            arguments += [action.option_strings[0], *value]
        else:
            arguments += [action.option_strings[0], str(value)]
    return arguments
