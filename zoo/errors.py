"""How the ``zoo`` command reports a failure: the root cause in one line, the traceback only when asked for."""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable

__all__ = ["debug_requested", "error_line", "run_reporting_errors"]

ENV_DEBUG = "ZOO_DEBUG"
# Lines of jsonargparse's reports that say nothing about the cause.
_NOISE = re.compile(
    r"^(Expected a <class 'NoneType'>|Given value|Subtypes:|Does not validate against|Errors:|Problem with given "
    r"class_path|Not a valid subclass|Import path|'?Configuration check failed|Parser key|- ?$)"
)


def debug_requested(argv: list[str]) -> bool:
    """``--debug`` on the command line or ``ZOO_DEBUG`` set to anything but ``0``."""
    return "--debug" in argv or os.environ.get(ENV_DEBUG, "0") not in ("", "0")


def _chain(err: BaseException) -> list[BaseException]:
    """``err`` and the exceptions it was raised from, outermost first."""
    chain, seen = [], set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        chain.append(err)
        err = err.__cause__ or (None if err.__suppress_context__ else err.__context__)
    return chain


def _message(err: BaseException) -> str:
    text = str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err).strip()
    candidates = []
    for raw in text.splitlines():
        line = raw.strip().lstrip("-").strip()
        if line and not _NOISE.match(line):
            candidates.append(line)
    if not candidates:
        return (text.splitlines() or [type(err).__name__])[0]
    if not re.search(r"Errors:|Given value|Parser key", text):
        return candidates[0]  # an ordinary message: its first line is the gist
    # jsonargparse puts the nested cause last; its own one-line errors ("Key x: ...") come first and are complete.
    specific = [c for c in candidates if not c.startswith(("Key ", "Option "))]
    return re.sub(r"\s+", " ", (specific or candidates)[-1 if specific else 0])


_FRAMING = re.compile(
    r"^\s*(Parser key|Does not validate|Problem with given class_path|Errors:|Given value|Subtypes:|Type typing|"
    r"Expected a path|- |Configuration check failed|Validation failed|Call to compute_fn)"
)


def error_line(err: BaseException) -> str:
    """The root cause of ``err`` as one line, prefixed with the config key it concerns when the config parser
    names one (``model.optimizer.lr: ...``): the outermost exception of the chain that is not one of
    jsonargparse's framing reports, which is the project's own message where it wrapped a library's."""
    chain = [e for e in _chain(err) if str(e).strip()] or [err]
    keys: list[str] = []
    for e in chain:
        match = re.match(r'\s*Parser key "([^"]+)"', str(e))
        if match and (not keys or keys[-1] != match.group(1)):
            keys.append(match.group(1))
    plain = [e for e in chain if not _FRAMING.match(str(e))]
    line = _message(plain[0] if plain else chain[-1])
    key = ".".join(keys)
    if key and not line.startswith(key.split(".")[0]):
        line = f"{key}: {line}"
    if re.search(r"(Option|Key) '[^']+' is not (accepted|expected)", line) or "Unrecognized arguments" in line:
        line += " (zoo <command> --help lists the options; --model.help <class_path> those of a method)"
    return line


def run_reporting_errors(fn: Callable[[], object], argv: list[str], prog: str = "zoo") -> None:
    """Runs ``fn``; on failure prints ``<prog>: error: <root cause>`` (and where to look) on stderr and exits 1.
    With ``--debug`` or ``ZOO_DEBUG=1`` the exception propagates with its full traceback."""
    if debug_requested(argv):
        fn()
        return
    try:
        fn()
    except SystemExit:
        raise
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        raise SystemExit(130) from None
    except BaseException as err:  # noqa: BLE001 - the command's last line of defence
        print(f"{prog}: error: {error_line(err)} [--debug: full traceback]", file=sys.stderr)
        raise SystemExit(1) from None
