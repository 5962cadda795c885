"""Output for people: tables, one-line error messages (the command lines' flags' too: `CliParser`), and progress
reports that never go backwards, with a bar only on a terminal.

The engine reports `progress(fraction, message)` per stage and per batch; stages restart their
own count, so a raw report can step back (5 % "landmarks" then 4 % "frames 4/101").
`monotone` keeps the largest fraction seen. `ConsoleProgress` draws a tqdm bar when the stream
is a terminal and otherwise writes one plain line at most every `every` seconds (logs, pipes, CI).
"""

from __future__ import annotations

import argparse
import difflib
import sys
import time
from typing import Callable, TextIO

ProgressFn = Callable[[float, str], None]


def monotone(report: ProgressFn) -> ProgressFn:
    """`report` called with fractions that never decrease (clamped to [0, 1])."""
    best = 0.0

    def call(fraction: float, message: str) -> None:
        nonlocal best
        best = min(1.0, max(best, float(fraction)))
        report(best, message)

    return call


class ConsoleProgress:
    """`with ConsoleProgress("warp") as progress: engine.animate(..., progress=progress)`."""

    def __init__(self, desc: str, stream: TextIO | None = None, every: float = 5.0, tty: bool | None = None):
        self.desc = desc
        self.stream = stream or sys.stderr
        self.every = every
        self.tty = self.stream.isatty() if tty is None else tty
        self.bar = None
        self.best = 0.0
        self.last_line = -float("inf")
        self.last_message = ""

    def __enter__(self) -> "ConsoleProgress":
        if self.tty:
            from tqdm import tqdm

            self.bar = tqdm(total=100, unit="%", desc=self.desc, bar_format="{l_bar}{bar}| {postfix}", file=self.stream)
        return self

    def __call__(self, fraction: float, message: str) -> None:
        self.best = min(1.0, max(self.best, float(fraction)))
        self.last_message = message
        if self.bar is not None:
            self.bar.update(round(100 * self.best) - self.bar.n)
            self.bar.set_postfix_str(message)
            return
        now = time.monotonic()
        if now - self.last_line >= self.every:
            self.last_line = now
            print(f"{self.desc}: {100 * self.best:3.0f}% {message}", file=self.stream, flush=True)

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.close()
        elif exc[0] is None and self.best > 0:
            print(f"{self.desc}: 100% done", file=self.stream, flush=True)


def counted(count: int, noun: str) -> str:
    """'1 frame', '45 frames'."""
    return f"{count} {noun}{'' if count == 1 else 's'}"


def one_line(message: str) -> str:
    """A message as one line (the command line's errors): a heading line's list items ("  - item" lines) follow it
    joined by "; " and closed by ".", and runs of white space become one space."""
    parts: list[str] = []
    items: list[str] = []

    def close_list() -> None:  # the items gathered so far, after their heading
        if items:
            listed = "; ".join(items) + "."
            if parts:
                parts[-1] += " " + listed
            else:
                parts.append(listed)
            items.clear()

    for line in message.splitlines():
        line = line.strip()
        if line.startswith("- "):
            items.append(line[2:].strip().rstrip(".,; "))
        elif line:
            close_list()
            parts.append(line)
    close_list()
    return " ".join(" ".join(parts).split())


def table(rows: list[list], header: list[str]) -> str:
    """A plain-text table: columns padded to their widest cell, a rule under the header."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]
    lines = ["  ".join(str(cell).ljust(w) for cell, w in zip(row, widths)).rstrip() for row in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


class CliParser(argparse.ArgumentParser):
    """argparse with one-line errors (cause, then where the flags are listed) and exit status 2; a flag the
    command does not know is named with the closest one it does, and its command's --help (also where argparse
    would first have complained of a required flag missing: `--output x.mp4` for `--out x.mp4`)."""

    _given: list[str] = []  # the words this parser read last (a subcommand's parser gets its own)

    def error(self, message: str) -> None:  # type: ignore[override]
        if message.startswith("the following arguments are required"):
            unknown = [word for word in self._given if word.startswith("--") and not self._knows(word)]
            commands = next((action for action in self._actions if isinstance(action, argparse._SubParsersAction)
                             and message.endswith(f": {action.dest}")), None)
            if unknown:
                message = self._unrecognized(unknown)
            elif commands is not None:  # (argparse names the subcommand by its attribute: "checkpoints_command")
                message = f"name a command: {', '.join(commands.choices)}"
        self.exit(2, f"error: {message}; see `{self.prog} --help`\n")

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[override]
        self._given = list(sys.argv[1:] if args is None else args)
        return super().parse_known_args(args, namespace)

    def parse_args(self, args=None, namespace=None):  # type: ignore[override]
        parsed, unknown = self.parse_known_args(args, namespace)
        if unknown:
            command = self._command_parser(parsed)
            command.error(command._unrecognized(unknown))
        return parsed

    def _knows(self, word: str) -> bool:
        """Whether `word` (`--flag` or `--flag=value`) is one of this parser's flags, or an abbreviation of one."""
        name = word.split("=")[0]
        return any(flag.startswith(name) for action in self._actions for flag in action.option_strings)

    def _unrecognized(self, unknown: list[str]) -> str:
        known = [flag for action in self._actions for flag in action.option_strings]
        guesses = [close[0] for word in unknown if word.startswith("-")
                   for close in [difflib.get_close_matches(word.split("=")[0], known, n=1, cutoff=0.6)] if close]
        hint = f" (did you mean {' / '.join(guesses)}?)" if guesses else ""
        return f"unrecognized arguments: {' '.join(unknown)}{hint}"

    def _command_parser(self, parsed: argparse.Namespace) -> argparse.ArgumentParser:
        """The parser of the (innermost) subcommand `parsed` was read with; this one where there is none."""
        for action in self._actions:
            if isinstance(action, argparse._SubParsersAction):
                command = action.choices.get(getattr(parsed, action.dest, None))
                if isinstance(command, CliParser):
                    return command._command_parser(parsed)
        return self
