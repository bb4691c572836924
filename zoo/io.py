"""File writing that never leaves a half-written file under its final name."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

__all__ = ["atomic_path", "atomic_write", "readable_mode"]


def readable_mode() -> int:
    """The mode a plain ``open()`` would give a new file under the current umask (0o644 under the usual 022)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = ".tmp") -> Iterator[Path]:
    """Yields a temporary path beside ``path``; on success it is renamed onto ``path``, on any error removed.

    The file gets the permissions of a plain ``open()`` (``tempfile.mkstemp`` would make it owner-only), and is
    fsynced before the rename, so a crash leaves either the old file or the new one, never a part of one.

    Example:
        >>> import tempfile, pathlib
        >>> target = pathlib.Path(tempfile.mkdtemp()) / "weights.bin"
        >>> with atomic_path(target) as tmp:
        ...     _ = tmp.write_bytes(b"abc")
        >>> target.read_bytes()
        b'abc'
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}-", suffix=suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, readable_mode())
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write(path: str | os.PathLike, data: str | bytes | Callable[[Path], object]) -> Path:
    """Writes text, bytes, or whatever ``data(tmp_path)`` writes, to ``path`` atomically (see :func:`atomic_path`).

    Example:
        >>> import tempfile, pathlib
        >>> card = atomic_write(pathlib.Path(tempfile.mkdtemp()) / "card.md", "# model card\\n")
        >>> card.read_text()
        '# model card\\n'
    """
    with atomic_path(path) as tmp:
        if isinstance(data, str):
            tmp.write_text(data)
        elif isinstance(data, bytes):
            tmp.write_bytes(data)
        else:
            data(tmp)
    return Path(path)
