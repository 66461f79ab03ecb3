"""Flags of ``lenet_xp.train`` as a sweep file spells them: checked against train's own
parser (:class:`FlagParser`), made into argv, each configuration parsed as ``train`` would;
and the sweep's errors, which name the file and the place in it (:class:`Where`)."""

from __future__ import annotations

import argparse
import difflib
from typing import Any

from lenet_xp.data.augment import parse_augment
from lenet_xp.models import presets
from lenet_xp.training.config import CONFIG_KEYS, RECIPES, build_parser

#: Train flags a sweep sets itself, and what to write instead.
SET_BY_SWEEP = {
    "out": "each run's folder is OUT/<run>: give --out to lenet_xp.sweep",
    "resume": "the sweep resumes interrupted runs itself",
    "metrics": "each run writes OUT/<run>/metrics.jsonl",
    "seed": "list them as seeds = [...] at the top of the file",
    "quiet": "runs are always quiet",
    "tensorboard": "one folder per run is not supported: use lenet_xp.report on a run",
}


class SweepError(Exception):
    """The sweep cannot run (its file, its output folder, Ray); the message is one line
    naming the problem and the fix."""


class SweepFileError(SweepError):
    """The sweep file is wrong; the message names the file, the place in it and the fix."""


class Where:
    """Names the file in every :class:`SweepError`."""

    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, place: str, problem: str) -> None:
        raise SweepFileError(f"{self.source}: {place}: {problem}")


def kind(value: Any) -> str:
    return {bool: "a boolean", int: "a number", float: "a number", str: "a string",
            list: "a list", dict: "a table"}.get(type(value), type(value).__name__)  # fmt: skip


class FlagParser:
    """Train's own parser, raising :class:`SweepError` instead of exiting: flags of the
    sweep file become argv and each configuration is parsed as ``train`` would."""

    def __init__(self) -> None:
        self.actions = {  # flag name without "--" -> its argparse action
            option[2:]: action
            for action in build_parser()._actions
            for option in action.option_strings
            if option.startswith("--") and action.dest != "help"
        }

    @staticmethod
    def _error(message: str) -> None:
        raise SweepError(message)

    def flags(self, where: Where, place: str, table: dict) -> dict[str, Any]:
        """``table`` checked: every key a train flag the sweep does not set itself, every
        value a boolean for a switch, else a string or a number."""
        for key, value in table.items():
            if key in SET_BY_SWEEP:
                where.fail(f"{place} {key}", f"is set by the sweep: {SET_BY_SWEEP[key]}")
            if key == "device" and place != "[train]":
                where.fail(f"{place} {key}", "is the same for a whole sweep: set it in [train]")
            action = self.actions.get(key)
            if action is None or key.startswith("no-"):
                close = difflib.get_close_matches(key.replace("_", "-"), self.actions, 1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                where.fail(f"{place} {key}", f"unknown train flag{hint}; see train --help")
            switch = action.nargs == 0
            if switch != isinstance(value, bool):
                kind = "true or false" if switch else "a value (string or number)"
                where.fail(f"{place} {key}", f"takes {kind}, got {value!r}")
            if not isinstance(value, bool | int | float | str):
                where.fail(f"{place} {key}", f"takes one value, got {kind(value)}")
        return dict(table)

    def argv(self, flags: dict[str, Any]) -> list[str]:
        """``--key value`` for each flag (``--key`` / ``--no-key`` for a switch)."""
        argv = []
        for key, value in flags.items():
            if isinstance(value, bool):
                negatable = isinstance(self.actions[key], argparse.BooleanOptionalAction)
                argv += [f"--{key}"] if value else [f"--no-{key}"] if negatable else []
            else:
                argv += [f"--{key}", str(value)]
        return argv

    def check(self, flags: dict[str, Any], config: str, where: Where) -> int:
        """Parse one configuration as ``train`` would (the recipe's values, then the flags;
        a fresh parser, as the recipe changes its defaults) and build its network; returns
        its number of epochs."""
        argv = self.argv(flags)
        parser = build_parser()
        parser.error = self._error  # type: ignore[method-assign]
        try:
            args = parser.parse_args(argv)
            parser.set_defaults(**RECIPES[args.recipe])
            args = parser.parse_args(argv)
            parse_augment(args.augment)
            presets.build_from_config({key: getattr(args, key) for key in CONFIG_KEYS})
        except (SweepError, ValueError, presets.PresetError) as exc:
            where.fail(f"configuration {config}", str(exc).removeprefix("argument "))
        return args.epochs
