"""Published checkpoints: a registry kept as data, hash-verified downloads and cache, and the ``Pretrained`` source
(imported on first use: the rest of the module needs no torch).

The registry is ``zoo/checkpoints/registry.json``: one entry per checkpoint with its name, task, method, the model
source that builds its architecture, data set, metrics, input size, normalisation, sha256, file size, URLs,
license, the config and the command that produced it. ``checkpoints.md`` is generated from it
(``zoo checkpoints markdown``). Files named ``<name>-<sha256[:8]>.safetensors`` hold the student weights only, or,
for entries of task ``dataset-distillation``, a distilled set (``zoo.dataset_distillation.save_distilled``'s
artifact: served by ``DistilledDataModule(path="hub:<name>")``, not by ``load``; its ``architecture`` is the
network the set was distilled for and its metrics the final evaluation of the run).

Where a checkpoint's file comes from (``download``/``resolve``, used by ``load`` and ``Pretrained``):

1. shipped inside the package (``zoo/checkpoints/<file>``): used in place, after checking size and sha256;
2. the cache, ``$ZOO_HOME/checkpoints/<file>`` (``ZOO_HOME`` defaults to ``~/.cache/distill-zoo``): checked the
   same way on every use; a corrupt file is deleted and downloaded again;
3. otherwise downloaded, trying ``$ZOO_CHECKPOINT_MIRROR/<file>`` first (when set) and then the entry's ``urls``
   in order (``file://``, ``http(s)://``, ``hf://org/repo/path/in/repo[@revision]``). Each download streams into
   a temporary file in the cache folder while hashing, and is renamed to its final name only when the byte count
   and the sha256 match the entry, so no failed, corrupt or interrupted transfer is ever found under that name.

``ZOO_OFFLINE=1`` forbids step 3: a checkpoint that is neither shipped nor cached fails, naming the variable, the
checkpoint and the path looked at.

Example:
    >>> from zoo import hub
    >>> [e["name"] for e in hub.list_checkpoints("*-teacher*")]
    ['digits-resnet32-teacher', 'digits-resnet32-teacher-s1', 'digits-resnet32-teacher-s2']
    >>> model, meta = hub.load("digits-resnet32-teacher")
    >>> path = hub.download("digits-resnet32-teacher", dir="weights")  # a verified copy in weights/
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import http.client
import json
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

from zoo.io import atomic_path

__all__ = [
    "ChecksumError",
    "DownloadError",
    "Pretrained",  # noqa: F822 - provided on first use by __getattr__
    "cache_dir",
    "checkpoint_urls",
    "download",
    "download_url_to_file",
    "get_entry",
    "is_offline",
    "list_checkpoints",
    "load",
    "registry",
    "remove_stale_parts",
    "sha256_file",
    "verify_file",
    "zoo_home",
]

PACKAGE_DIR = Path(__file__).parent / "checkpoints"
REGISTRY_FILE = PACKAGE_DIR / "registry.json"
ENV_HOME = "ZOO_HOME"
ENV_OFFLINE = "ZOO_OFFLINE"
ENV_MIRROR = "ZOO_CHECKPOINT_MIRROR"
ENV_REGISTRY = "ZOO_REGISTRY"  # extra registries: files or publish folders, separated by os.pathsep
DEFAULT_HOME = "~/.cache/distill-zoo"
TASK_DISTILLED = "dataset-distillation"
DISTILLED_FIELDS = ("ipc", "iteration", "eval_nets")  # required, besides REQUIRED_FIELDS, of a distilled set's entry
NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._-]*"  # a registry name: also the start of its file name
# Seconds a connection or a single read may stall before an HTTP download is abandoned (not a total limit).
DOWNLOAD_TIMEOUT = 60.0
_CHUNK = 1 << 20
PART_SUFFIX = ".part"
# A partial download untouched for this long belongs to a dead process (pip and huggingface_hub use similar rules).
STALE_PART_SECONDS = 600.0
REQUIRED_FIELDS = (
    "name",
    "task",
    "method",
    "architecture",
    "dataset",
    "metrics",
    "input_size",
    "mean",
    "std",
    "sha256",
    "file_size",
    "file",
    "urls",
    "license",
    "config",
    "command",
)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """The sha256 hex digest of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _validated(entries: Any, source: Path) -> list[dict[str, Any]]:
    if not isinstance(entries, list):
        raise ValueError(f"checkpoint registry {source} must hold a JSON list of entries")
    for i, entry in enumerate(entries):
        missing = [k for k in REQUIRED_FIELDS if k not in entry]
        if missing:
            raise ValueError(f"checkpoint registry {source}: entry {i} ({entry.get('name')!r}) lacks {missing}")
        missing = [k for k in DISTILLED_FIELDS if entry["task"] == TASK_DISTILLED and k not in entry]
        if missing:
            raise ValueError(f"checkpoint registry {source}: distilled set {entry['name']!r} lacks {missing}")
        if not str(entry["file"]).endswith(f"-{entry['sha256'][:8]}.safetensors"):
            raise ValueError(
                f"checkpoint registry {source}: {entry['name']}.file must end in -<sha256[:8]>.safetensors"
            )
    return entries


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"checkpoint registry {path} is not valid JSON: {err}") from err


def _user_entries(spec: str) -> list[dict[str, Any]]:
    """The entries of ``ZOO_REGISTRY``: registry files (a JSON list), publication cards (``<name>-<sha8>.json``,
    whose ``entry`` is read), or folders holding either (a ``zoo checkpoints publish --dir``); each entry
    remembers its folder, where its file is looked for first."""
    entries = []
    for item in filter(None, spec.split(os.pathsep)):
        path = Path(item).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"{ENV_REGISTRY}: no such file or folder: {path}")
        files = sorted(path.glob("*.json")) if path.is_dir() else [path]
        for file in files:
            data = _read_json(file)
            found = [data["entry"]] if isinstance(data, dict) and "entry" in data else data
            if path.is_dir() and not isinstance(found, list):
                continue  # some other JSON file in the folder
            entries += [{**e, "_dir": str(file.parent.resolve())} for e in _validated(found, file)]
    return entries


def registry(path: str | os.PathLike | None = None) -> list[dict[str, Any]]:
    """All registry entries, validated (a malformed entry fails naming the entry and the field): the package's
    registry (``REGISTRY_FILE``, read at call time) and those of ``ZOO_REGISTRY`` (see :func:`_user_entries`), or
    only the file ``path``. A name given twice fails, naming it."""
    entries = _validated(_read_json(Path(path)), Path(path)) if path is not None else []
    if path is None:
        entries = _validated(_read_json(REGISTRY_FILE), REGISTRY_FILE) + _user_entries(os.environ.get(ENV_REGISTRY, ""))
    seen: set[str] = set()
    for entry in entries:
        if entry["name"] in seen:
            raise ValueError(f"checkpoint registry: the name {entry['name']!r} is given twice "
                             f"(the package's registry and {ENV_REGISTRY} share a name?)")
        seen.add(entry["name"])
    return entries


def list_checkpoints(pattern: str = "*") -> list[dict[str, Any]]:
    """Registry entries whose name matches a shell-style pattern (``*resnet*``), sorted by name."""
    return sorted((e for e in registry() if fnmatch.fnmatch(e["name"], pattern)), key=lambda e: e["name"])


def get_entry(name: str) -> dict[str, Any]:
    """The registry entry called ``name``; an unknown name fails listing the known ones."""
    for entry in registry():
        if entry["name"] == name:
            return entry
    known = ", ".join(e["name"] for e in registry())
    raise KeyError(f"no published checkpoint named {name!r}; known: {known}")


class ChecksumError(ValueError):
    """A file's size or sha256 differs from its registry entry.

    Attributes:
        path: the file (or URL) checked; expected, actual: the sha256 digests (or byte counts) compared.
    """

    def __init__(
        self, message: str, *, path: str | os.PathLike | None = None, expected: Any = None, actual: Any = None
    ) -> None:
        super().__init__(message)
        self.path, self.expected, self.actual = path, expected, actual


class DownloadError(OSError):
    """No source delivered a verified file (or one transfer failed: HTTP error, unreachable host, early close).

    Attributes:
        failures: ``(url, error)`` for every source tried, in order (empty for a single transfer's own error).
    """

    def __init__(self, message: str, failures: list[tuple[str, BaseException]] | None = None) -> None:
        super().__init__(message)
        self.failures = list(failures or [])

    def __str__(self) -> str:  # OSError's own __str__ would add errno/filename noise
        return str(self.args[0])


def zoo_home() -> Path:
    """``$ZOO_HOME``, or ``~/.cache/distill-zoo`` when it is unset or empty."""
    return Path(os.environ.get(ENV_HOME) or DEFAULT_HOME).expanduser()


def cache_dir() -> Path:
    """Where downloaded checkpoints live: ``$ZOO_HOME/checkpoints``."""
    return zoo_home() / "checkpoints"


def is_offline() -> bool:
    """True when ``ZOO_OFFLINE`` is set to 1/true/yes/on: checkpoints come from the package or the cache only."""
    value = os.environ.get(ENV_OFFLINE, "").strip().lower()
    if value in ("", "0", "false", "no", "off"):
        return False
    if value in ("1", "true", "yes", "on"):
        return True
    raise ValueError(f"{ENV_OFFLINE}={os.environ[ENV_OFFLINE]!r}: expected 1/true/yes/on or 0/false/no/off")


def verify_file(path: str | os.PathLike, sha256: str, file_size: int | None = None) -> Path:
    """Checks a file's size (cheap, first) and sha256; returns the path or raises ``ChecksumError`` naming both."""
    path = Path(path)
    if file_size is not None:
        size = path.stat().st_size
        if size != file_size:
            raise ChecksumError(
                f"{path}: size mismatch: expected {file_size} bytes, got {size}",
                path=path,
                expected=file_size,
                actual=size,
            )
    actual = sha256_file(path)
    if actual != sha256:
        raise ChecksumError(
            f"{path}: sha256 mismatch: expected {sha256}, got {actual}", path=path, expected=sha256, actual=actual
        )
    return path


def _mirror_url(base: str, file: str) -> str:
    """``<base>/<file>``; a plain folder becomes a ``file://`` URL, and ``hf://org/repo@rev`` keeps its revision."""
    base = base.strip()
    if base.startswith("hf://"):
        root, at, revision = base.rpartition("@") if "@" in base else (base, "", "")
        return f"{root.rstrip('/')}/{file}{at}{revision}"
    if "://" not in base:
        base = Path(base).expanduser().resolve().as_uri()
    return f"{base.rstrip('/')}/{urllib.parse.quote(file)}"


def checkpoint_urls(entry: dict[str, Any]) -> list[str]:
    """The URLs a download tries, in order: ``$ZOO_CHECKPOINT_MIRROR/<file>`` when set, then the entry's ``urls``."""
    urls = entry["urls"]
    if isinstance(urls, str) or not isinstance(urls, list):
        raise ValueError(f"checkpoint registry: {entry['name']}.urls must be a list of URLs, got {urls!r}")
    mirror = os.environ.get(ENV_MIRROR, "").strip()
    return ([_mirror_url(mirror, entry["file"])] if mirror else []) + [str(u) for u in urls]


def _parse_hf_url(url: str) -> tuple[str, str, str | None]:
    """``hf://org/repo/path/in/repo[@revision]`` -> (``org/repo``, ``path/in/repo``, revision or None)."""
    rest = url[len("hf://") :]
    if "@" in rest:
        rest, _, revision = rest.rpartition("@")
    else:
        revision = ""
    parts = rest.split("/", 2)
    if len(parts) < 3 or not all(parts):
        raise ValueError(f"{url}: expected hf://org/repo/path/in/repo[@revision]")
    return f"{parts[0]}/{parts[1]}", parts[2], revision or None


def _hf_download(url: str) -> Path:
    """Fetches an ``hf://`` URL into the Hugging Face cache (``huggingface_hub.hf_hub_download``); returns its path."""
    repo_id, filename, revision = _parse_hf_url(url)
    try:
        import huggingface_hub
    except ImportError as err:
        raise DownloadError(
            f"{url}: the hf:// scheme needs the huggingface_hub package (pip install huggingface_hub)"
        ) from err
    try:
        local = huggingface_hub.hf_hub_download(repo_id=repo_id, filename=filename, revision=revision)
    except Exception as err:  # the hub raises many types; re-raised naming the URL
        raise DownloadError(f"{url}: Hugging Face Hub download failed: {type(err).__name__}: {err}") from err
    return Path(local)


@contextlib.contextmanager
def _open_url(url: str, timeout: float) -> Iterator[tuple[BinaryIO, int | None]]:
    """Opens ``url`` for streaming; yields the stream and the announced length (None when unknown)."""
    parsed = urllib.parse.urlparse(url)
    scheme = parsed.scheme.lower()
    if scheme in ("http", "https"):
        request = urllib.request.Request(url, headers={"User-Agent": "distill-zoo"})
        try:
            response = urllib.request.urlopen(request, timeout=timeout)
        except urllib.error.HTTPError as err:
            raise DownloadError(f"{url}: HTTP {err.code} {err.reason}") from err
        except urllib.error.URLError as err:
            raise DownloadError(f"{url}: cannot connect: {err.reason}") from err
        except (OSError, http.client.HTTPException) as err:
            raise DownloadError(f"{url}: cannot connect: {type(err).__name__}: {err}") from err
        with response:
            length = response.headers.get("Content-Length")
            yield response, int(length) if length and length.isdigit() else None
        return
    if scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise ValueError(f"{url}: file:// URLs must name a local path (file:///abs/path)")
        path = Path(urllib.request.url2pathname(parsed.path))
    elif scheme == "hf":
        path = _hf_download(url)
    else:
        raise ValueError(f"{url}: unsupported URL scheme {scheme!r}; expected file://, http://, https:// or hf://")
    try:
        f = open(path, "rb")  # noqa: SIM115 - closed by the with below
    except OSError as err:
        raise DownloadError(f"{url}: cannot open {path}: {err.strerror or err}") from err
    with f:
        yield f, os.fstat(f.fileno()).st_size


def download_url_to_file(
    url: str,
    dst: str | os.PathLike,
    sha256: str,
    file_size: int | None = None,
    timeout: float = DOWNLOAD_TIMEOUT,
) -> Path:
    """Streams ``url`` to ``dst``, verifying the byte count and sha256 on the way; returns ``dst``.

    The bytes go to a temporary file in ``dst``'s folder, hashed as they arrive; only when the count matches
    ``file_size`` (and the announced Content-Length) and the digest matches ``sha256`` is the file renamed to
    ``dst`` (atomic on one file system). On any failure, interruption included, the temporary file is deleted
    and ``dst`` is left as it was.

    Args:
        url: ``file://``, ``http(s)://`` or ``hf://org/repo/path/in/repo[@revision]``.
        dst: the final path.
        sha256: the expected hex digest.
        file_size: the expected size in bytes (None: only the Content-Length, when announced, is checked).
        timeout: seconds a connection or a read may stall (HTTP).

    Raises:
        DownloadError: HTTP error, unreachable host, stalled or early-closed transfer, wrong byte count.
        ChecksumError: all bytes arrived but the sha256 differs (the message names expected and actual).
        ValueError: an unsupported or malformed URL.
    """
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_parts(dst)
    with _open_url(url, timeout) as (stream, announced):
        if announced is not None and file_size is not None and announced != file_size:
            raise DownloadError(f"{url}: announces {announced} bytes but the registry expects {file_size}")
        expected_size = file_size if file_size is not None else announced
        # the bytes go to dst's folder as .<name>-*.part; renamed onto dst only once their count and hash match
        with atomic_path(dst, suffix=PART_SUFFIX) as tmp, open(tmp, "wb") as out:
            digest = hashlib.sha256()
            received = 0
            while True:
                try:
                    block = stream.read(_CHUNK)
                except (OSError, http.client.HTTPException) as err:
                    raise DownloadError(
                        f"{url}: transfer interrupted after {received} bytes: {type(err).__name__}: {err}"
                    ) from err
                if not block:
                    break
                received += len(block)
                if expected_size is not None and received > expected_size:
                    raise DownloadError(f"{url}: sent more than the expected {expected_size} bytes")
                digest.update(block)
                out.write(block)
            if expected_size is not None and received != expected_size:
                raise DownloadError(
                    f"{url}: incomplete transfer: got {received} of {expected_size} bytes (connection closed early?)"
                )
            actual = digest.hexdigest()
            if actual != sha256:
                raise ChecksumError(
                    f"{url}: sha256 mismatch: expected {sha256}, got {actual}", path=url, expected=sha256, actual=actual
                )
            out.flush()
    return dst


def remove_stale_parts(dst: str | os.PathLike, max_age: float = STALE_PART_SECONDS) -> list[Path]:
    """Deletes the partial downloads of ``dst`` (``.<name>-*.part`` beside it) that no process has written to for
    ``max_age`` seconds: what a killed download leaves. A live download writes every few seconds (a stalled one
    gives up after ``DOWNLOAD_TIMEOUT``), so it is never taken for stale. Returns the files removed."""
    dst = Path(dst)
    removed = []
    for part in dst.parent.glob(f".{dst.name}-*{PART_SUFFIX}"):
        with contextlib.suppress(FileNotFoundError):
            if time.time() - part.stat().st_mtime > max_age:
                part.unlink()
                removed.append(part)
    return removed


def _local_file(entry: dict[str, Any]) -> Path:
    """The verified local file of an entry: shipped, cached, or downloaded into the cache (see the module doc)."""
    name, file = entry["name"], entry["file"]
    sha256, file_size = entry["sha256"], entry["file_size"]
    shipped = Path(entry["_dir"]) / file if entry.get("_dir") else PACKAGE_DIR / file
    if shipped.is_file():
        try:
            return verify_file(shipped, sha256, file_size)
        except ChecksumError as err:
            raise ChecksumError(
                f"checkpoint {name!r}: the file {shipped} is corrupt "
                f"({'republish it' if entry.get('_dir') else 'reinstall distill-zoo'}): {err}",
                path=shipped,
                expected=err.expected,
                actual=err.actual,
            ) from None
    cached = cache_dir() / file
    offline = is_offline()
    if cached.is_file():
        try:
            return verify_file(cached, sha256, file_size)
        except ChecksumError as err:
            if offline:
                raise ChecksumError(
                    f"checkpoint {name!r}: the cached file {cached} is corrupt and {ENV_OFFLINE}=1 forbids downloading "
                    f"it again: {err}",
                    path=cached,
                    expected=err.expected,
                    actual=err.actual,
                ) from None
            print(f"zoo.hub: removing corrupt cached file ({err}); downloading it again", file=sys.stderr)
            cached.unlink(missing_ok=True)
    elif offline:
        raise FileNotFoundError(
            f"checkpoint {name!r}: {ENV_OFFLINE}=1 and the file is not in the cache (looked for {cached}); unset "
            f"{ENV_OFFLINE} to download it, or copy {file} there (`zoo checkpoints download {name} --dir DIR` on a "
            "connected machine)"
        )
    urls = checkpoint_urls(entry)
    if not urls:
        raise FileNotFoundError(
            f"checkpoint {name!r}: not shipped ({shipped}), not cached ({cached}), and its registry entry lists no "
            f"urls; set {ENV_MIRROR}=<base-url> to fetch {file} from a mirror"
        )
    failures: list[tuple[str, BaseException]] = []
    for url in urls:
        print(f"zoo.hub: downloading {name} from {url} to {cached}", file=sys.stderr)
        try:
            return download_url_to_file(url, cached, sha256, file_size)
        except Exception as err:  # noqa: BLE001 - any failing source: try the next, report all at the end
            failures.append((url, err))
    report = "\n".join(f"  - {err}" if url in str(err) else f"  - {url}: {err}" for url, err in failures)
    raise DownloadError(
        f"checkpoint {name!r}: no source delivered a verified {file} ({len(failures)} tried):\n{report}", failures
    ) from failures[-1][1]


def download(name: str, dir: str | os.PathLike | None = None) -> Path:
    """The local, verified file of a registry entry (weights, or a distilled set), downloading it into the cache
    when needed.

    Order: the file shipped in the package, then ``$ZOO_HOME/checkpoints/<file>``, then the mirror
    (``$ZOO_CHECKPOINT_MIRROR``) and the entry's ``urls`` (see the module docstring; ``ZOO_OFFLINE=1`` stops
    before downloading). Every file is checked against the entry's size and sha256 before it is returned.

    Args:
        name: the registry name (``zoo checkpoints list``).
        dir: when given, a verified copy is written to ``dir/<file>`` (temp file + rename) and that path returned;
            an existing, valid copy there is reused.

    Raises:
        KeyError: unknown name. FileNotFoundError: offline and not cached, or no source to download from.
        ChecksumError: a shipped (or, offline, a cached) file is corrupt. DownloadError: every source failed.
    """
    is_offline()  # an unreadable ZOO_OFFLINE is refused whatever the source
    entry = get_entry(name)
    source = _local_file(entry)
    if dir is None:
        return source
    target = Path(dir).expanduser() / entry["file"]
    if target.is_file():
        if target.resolve() == source.resolve():
            return target
        with contextlib.suppress(ChecksumError):
            return verify_file(target, entry["sha256"], entry["file_size"])
    return download_url_to_file(source.resolve().as_uri(), target, entry["sha256"], entry["file_size"])


def load(name: str) -> tuple[Any, dict[str, Any]]:
    """A ready model (eval mode) and its registry entry, which carries the preprocessing (``mean``, ``std``,
    ``input_size``) and the metrics. The weights come from ``download(name)``: shipped, cached or fetched, verified.
    """
    from zoo.models.sources import load_weights, source_from_config

    entry = get_entry(name)
    if entry["task"] == TASK_DISTILLED:
        raise ValueError(
            f"checkpoint {name!r} is a distilled set, not a model: train on it with "
            f"DistilledDataModule(path='hub:{name}') or fetch it with zoo.hub.download({name!r})"
        )
    model = source_from_config(entry["architecture"]).build()
    load_weights(model, download(name), field=f"checkpoint {name!r}")
    return model.eval(), entry


def _pretrained_class() -> type:
    """Defines ``Pretrained`` on first use: it is a model source, which needs torch; the registry, verification and
    download do not, so ``zoo checkpoints list`` starts without it."""
    from torch import nn

    from zoo.models.sources import ModelSource

    class Pretrained(ModelSource):
        """A published checkpoint of the registry, usable wherever a model source is expected::

            teacher: {class_path: zoo.hub.Pretrained, init_args: {name: digits-resnet32-teacher}}

        The architecture comes from the entry, the weights from ``download(name)`` (shipped, cached or fetched on first
        use, verified against the entry's sha256), and the normalisation the weights expect (``mean``/``std``) from the
        entry, so a teacher re-normalises its input when needed.

        Args:
            name: the registry name (see ``zoo checkpoints list``).
        """

        def __init__(self, name: str) -> None:
            self.name = name
            entry = get_entry(name)
            if entry["task"] == TASK_DISTILLED:
                raise ValueError(
                    f"Pretrained.name: {name!r} is a distilled set, not a model; use it as data: "
                    f"DistilledDataModule(path='hub:{name}')"
                )
            self.mean, self.std = tuple(entry["mean"]), tuple(entry["std"])
            # what the weights were trained for, checked against the data before they are loaded
            arch = entry["architecture"].get("init_args", {})
            input_size = entry.get("input_size") or []
            self.num_classes = arch.get("num_classes")
            self.in_chans = arch.get("in_chans") or (input_size[0] if input_size else None)

        def build(self, num_classes: int | None = None, in_chans: int | None = None) -> nn.Module:
            model, entry = load(self.name)
            arch = entry["architecture"].get("init_args", {})
            for field, given in (("num_classes", num_classes), ("in_chans", in_chans)):
                own = arch.get(field)
                if given is not None and own is not None and own != given:
                    raise ValueError(
                        f"Pretrained({self.name!r}) has {field}={own} but the data has {given}; use a checkpoint "
                        "trained for this data or change the data module"
                    )
            return model

        def describe(self) -> str:
            return f"hub:{self.name}"

    Pretrained.__module__, Pretrained.__qualname__ = __name__, "Pretrained"  # configs name it zoo.hub.Pretrained
    return Pretrained


def __getattr__(name: str) -> Any:
    if name == "Pretrained":
        cls = globals()["Pretrained"] = _pretrained_class()
        return cls
    raise AttributeError(f"module 'zoo.hub' has no attribute {name!r}")
