"""The command list of a benchmark's results file: rows of a later command replace the same rows of an earlier one,
so the file names every command that made a row still in it."""

from __future__ import annotations

import sys


def this_command(script: str) -> str:
    """``python benchmarks/<script> <args>`` as this process was started."""
    return " ".join(["python", f"benchmarks/{script}", *sys.argv[1:]])


def merge_commands(earlier: dict, command: str) -> list[str]:
    """The earlier results' ``commands`` (or its single ``command``) plus ``command``; a rerun of the last command
    adds nothing."""
    commands = [c.strip() for c in earlier.get("commands", [earlier["command"]] if "command" in earlier else [])]
    return commands if commands[-1:] == [command] else [*commands, command]
