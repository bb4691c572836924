"""The ``zoo`` console script: a light dispatcher, so that ``zoo checkpoints`` and ``zoo --help`` start without
importing torch or Lightning; the training commands go to LightningCLI (``zoo.cli``)."""

from __future__ import annotations

import sys

from zoo.errors import run_reporting_errors

__all__ = ["main"]

USAGE = """usage: zoo [--debug] <command> [options]

commands:
  fit          train a method from a config:            zoo fit --config configs/quickstart.yaml
  validate     evaluate a checkpoint on the val split:   zoo validate --config C --ckpt_path last
  test         evaluate a checkpoint on the test split:  zoo test --config C --ckpt_path last
  predict      run the model on the predict split (a VLM answers questions)
  check-data   read every batch of a config's data once and report bad labels or files
  checkpoints  published checkpoints: list | verify | download | publish | markdown

`zoo <command> --help` lists a command's options. --debug (or ZOO_DEBUG=1) shows full tracebacks.
"""


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``zoo`` console script."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(USAGE, end="")
        return
    if args[0] == "checkpoints":
        from zoo.hub_cli import main as checkpoints_main

        rest = [a for a in args[1:] if a != "--debug"]

        def run() -> None:
            raise SystemExit(checkpoints_main(rest, test_metrics=_test_metrics))

        run_reporting_errors(run, args, prog="zoo checkpoints")
        return
    from zoo import cli

    cli.main(args)


def _test_metrics(config_file, ckpt):  # noqa: ANN001, ANN202 - the hub CLI's evaluation callback
    from zoo.cli import test_metrics  # Lightning is imported only when a publish evaluates a run

    return test_metrics(config_file, ckpt)


if __name__ == "__main__":
    main()
