"""Start-up time of the ``zoo`` commands, next to a plain LightningCLI, and what each command prints on stderr.

Each command runs as a fresh subprocess ``--runs`` times, the commands interleaved round by round (the machine's
load moves timings by tens of per cent between minutes, and shifts every command of a round alike); the table gives
the median wall time and its range, and the median CPU time of the process (user + system, from ``getrusage`` of the
children: the work itself, which other jobs on the cores do not stretch). Commands:

    zoo checkpoints list     the registry as a table (torch-free: the dispatcher in zoo/__main__.py)
    zoo --help               the dispatcher's usage
    zoo fit --help           ZooCLI's help (imports Lightning, torch and every zoo method, to list them)
    LightningCLI fit --help  a six-line script: LightningCLI(LightningModule, LightningDataModule) in subclass modes
    import torch / import lightning    the floors under any command that needs them

Then every ``zoo`` command is run once more and its stderr kept (``--no-run-check`` skips the runs that train): the
help of each subcommand, ``zoo checkpoints list | markdown``, and in a temporary folder a two-step ``zoo fit`` of the
quickstart config, ``zoo validate`` and ``zoo test`` of it (``--ckpt_path last``), ``zoo checkpoints publish`` of the
run (which evaluates it on the test split) and ``zoo checkpoints verify`` of the file. Lightning's info lines go to
stdout, so stderr should hold warnings only; the table lists each line of it.

    python benchmarks/startup.py [--runs 7] [--no-run-check]     # about 3 min on 2 busy cores

Results: benchmarks/results/startup.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
LIGHTNING_CLI = """import lightning as L
from lightning.pytorch.cli import LightningCLI

LightningCLI(L.LightningModule, L.LightningDataModule, subclass_mode_model=True, subclass_mode_data=True)
"""


def zoo_command() -> list[str]:
    """The ``zoo`` console script next to this Python, else ``python -m zoo``."""
    script = Path(sys.executable).parent / "zoo"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "zoo"]


def run(cmd: list[str], cwd: Path) -> tuple[float, float, subprocess.CompletedProcess]:
    """Wall seconds, CPU seconds (user + system of the process and what it waited for) and the result."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime), done


def timed_commands(tmp: Path) -> dict[str, list[str]]:
    (tmp / "lightning_cli.py").write_text(LIGHTNING_CLI)
    zoo = zoo_command()
    return {
        "zoo checkpoints list": [*zoo, "checkpoints", "list"],
        "zoo --help": [*zoo, "--help"],
        "zoo fit --help": [*zoo, "fit", "--help"],
        "LightningCLI fit --help": [sys.executable, str(tmp / "lightning_cli.py"), "fit", "--help"],
        "python -c 'import torch'": [sys.executable, "-c", "import torch"],
        "python -c 'import lightning'": [sys.executable, "-c", "import lightning"],
    }


def checked_commands(tmp: Path, train: bool) -> list[tuple[str, list[str]]]:
    """Every zoo command once, in an order where each finds what the earlier ones made."""
    zoo = zoo_command()
    config = str(ROOT / "configs" / "quickstart.yaml")
    short = ["--trainer.max_epochs=1", "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1",
             "--trainer.limit_test_batches=1", "--trainer.log_every_n_steps=1"]
    commands = [
        ("zoo", zoo),
        ("zoo --help", [*zoo, "--help"]),
        *[(f"zoo {sub} --help", [*zoo, sub, "--help"]) for sub in ("fit", "validate", "test", "predict", "check-data")],
        ("zoo checkpoints --help", [*zoo, "checkpoints", "--help"]),
        ("zoo checkpoints list", [*zoo, "checkpoints", "list"]),
        ("zoo checkpoints markdown", [*zoo, "checkpoints", "markdown"]),
    ]
    if train:
        commands += [
            ("zoo check-data --config quickstart.yaml", [*zoo, "check-data", "--config", config]),
            ("zoo fit --config quickstart.yaml (2 steps)", [*zoo, "fit", "--config", config, *short]),
            ("zoo validate --ckpt_path last", [*zoo, "validate", "--config", config, "--ckpt_path", "last", *short]),
            ("zoo test --ckpt_path last", [*zoo, "test", "--config", config, "--ckpt_path", "last", *short]),
            ("zoo checkpoints publish <run>",
             [*zoo, "checkpoints", "publish", "runs/quickstart/version_0", "--name", "startup-check", "--dir", "pub"]),
            ("zoo checkpoints verify <file>", [*zoo, "checkpoints", "verify", "<published file>"]),
        ]
    return commands


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--no-run-check", action="store_true", help="check only the commands that do not train")
    args = parser.parse_args()
    load_before = os.getloadavg()
    began = time.time()
    results: dict = {"seconds": {}, "stderr": {}, "returncode": {}}
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        commands = timed_commands(tmp)
        seconds: dict[str, list[float]] = {k: [] for k in commands}
        cpu: dict[str, list[float]] = {k: [] for k in commands}
        for r in range(args.runs):
            for key, cmd in commands.items():
                elapsed, used, done = run(cmd, tmp)
                if done.returncode != 0:
                    raise SystemExit(f"{key} failed ({done.returncode}):\n{done.stderr[-3000:]}")
                seconds[key].append(elapsed)
                cpu[key].append(used)
            print(f"round {r + 1}/{args.runs}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in seconds.items()),
                  flush=True)
        results["seconds"] = {k: {"median": statistics.median(v), "min": min(v), "max": max(v), "runs": v,
                                  "cpu_median": statistics.median(cpu[k]), "cpu_runs": cpu[k]}
                              for k, v in seconds.items()}
        pair = ("zoo fit --help", "LightningCLI fit --help")
        for name, table in (("wall", seconds), ("cpu", cpu)):
            per_round = [a / b for a, b in zip(table[pair[0]], table[pair[1]])]
            results[f"fit_help_ratio_{name}"] = {"median": statistics.median(per_round), "min": min(per_round),
                                                 "max": max(per_round)}
        for key, cmd in checked_commands(tmp, train=not args.no_run_check):
            if "<published file>" in cmd:
                published = sorted((tmp / "pub").glob("startup-check-*.safetensors"))
                cmd = [c if c != "<published file>" else str(published[0] if published else "missing") for c in cmd]
            _, _, done = run(cmd, tmp)
            results["returncode"][key] = done.returncode
            results["stderr"][key] = [line for line in done.stderr.splitlines() if line.strip()]
            print(f"{key}: exit {done.returncode}, {len(results['stderr'][key])} stderr lines", flush=True)
    results["machine"] = f"{platform.processor() or platform.machine()} CPU ({os.cpu_count()} cores)"
    results["load_average"] = {"before": [round(v, 2) for v in load_before],
                               "after": [round(v, 2) for v in os.getloadavg()]}
    results["minutes"] = round((time.time() - began) / 60, 1)
    results["python"] = platform.python_version()
    results["command"] = "python benchmarks/startup.py" + (f" --runs {args.runs}" if args.runs != 7 else "") + (
        " --no-run-check" if args.no_run_check else ""
    )
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "startup.json").write_text(json.dumps(results, indent=2) + "\n")
    table = render(results, args.runs)
    (RESULTS / "startup.md").write_text(table + "\n")
    print(table)


def render(results: dict, runs: int) -> str:
    s, load = results["seconds"], results["load_average"]
    base = s["LightningCLI fit --help"]
    lines = [
        f"Wall time of each command as a fresh process, median and range of {runs} interleaved runs; machine: "
        f"{results['machine']}, 1-minute load average {load['before'][0]:.1f} before and {load['after'][0]:.1f} "
        f"after (other jobs shared the cores); Python {results['python']}; command: `{results['command']}` "
        f"({results['minutes']} min).",
        "",
        "| command | wall s | range | ÷ LightningCLI fit --help | CPU s | ÷ LightningCLI fit --help |",
        "|---|---|---|---|---|---|",
        *(f"| `{k}` | {v['median']:.2f} | {v['min']:.2f}–{v['max']:.2f} | {v['median'] / base['median']:.2f} | "
          f"{v['cpu_median']:.2f} | {v['cpu_median'] / base['cpu_median']:.2f} |" for k, v in s.items()),
        "",
        "`zoo fit --help` ÷ `LightningCLI fit --help`, per round (the two ran back to back), median [min, max]: wall "
        + "{median:.2f} [{min:.2f}, {max:.2f}]".format(**results["fit_help_ratio_wall"]) + ", CPU "
        + "{median:.2f} [{min:.2f}, {max:.2f}]".format(**results["fit_help_ratio_cpu"]) + ".",
        "",
        "What each zoo command printed on stderr (Lightning's info lines go to stdout; a warning is a line here):",
        "",
        "| command | exit | stderr |",
        "|---|---|---|",
    ]
    for key, err in results["stderr"].items():
        shown = "<br>".join(line.replace("|", "\\|")[:300] for line in err) if err else "—"
        lines.append(f"| `{key}` | {results['returncode'][key]} | {shown} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
