"""Checkpoint downloads: cache, sha256 verified while streaming, atomic moves, mirrors, offline mode, file/http/hf.

Every test runs against a temporary registry whose entry is not shipped in the (temporary) package folder, a
temporary ``ZOO_HOME``, and a real ``ThreadingHTTPServer`` on 127.0.0.1; nothing here touches the network.
"""

from __future__ import annotations

import functools
import hashlib
import http.server
import json
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from zoo import hub, publish
from zoo.hub_cli import main as checkpoints_main
from zoo.models import CIFARModel

NAME = "tiny-resnet8"
ARCH = {"class_path": "zoo.models.CIFARModel", "init_args": {"name": "resnet8", "num_classes": 10, "in_chans": 1}}


class _Handler(http.server.SimpleHTTPRequestHandler):
    """Serves a folder and records each request; with ``server.truncate`` it announces the full Content-Length
    but closes the connection after half the bytes."""

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        self.server.requests.append(self.path)
        if not self.server.truncate:
            return super().do_GET()
        path = Path(self.translate_path(self.path))
        if not path.is_file():
            self.send_error(404)
            return
        data = path.read_bytes()
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data[: len(data) // 2])
        self.wfile.flush()
        self.close_connection = True


class Server:
    """A real HTTP server in a thread; ``url`` is its base, ``requests`` the paths asked for."""

    def __init__(self, folder: Path, truncate: bool = False) -> None:
        self.httpd = http.server.ThreadingHTTPServer(
            ("127.0.0.1", 0), functools.partial(_Handler, directory=str(folder))
        )
        self.httpd.requests = []
        self.httpd.truncate = truncate
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    @property
    def requests(self) -> list[str]:
        return self.httpd.requests

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


@pytest.fixture
def serve() -> Iterator[Callable[..., Server]]:
    servers: list[Server] = []

    def start(folder: Path, truncate: bool = False) -> Server:
        servers.append(Server(folder, truncate))
        return servers[-1]

    yield start
    for server in servers:
        server.stop()


def dead_url() -> str:
    """A URL on a port nobody listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def published(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A tiny CIFAR resnet8 (1 channel, 10 classes), exported to ``tiny-resnet8-<sha8>.safetensors``."""
    folder = tmp_path_factory.mktemp("published")
    torch.manual_seed(0)
    model = CIFARModel(**ARCH["init_args"]).build().eval()
    torch.save(model.state_dict(), folder / "weights.pt")
    path, digest = publish.export_student(folder / "weights.pt", folder / "files", NAME)
    x = torch.randn(4, 1, 16, 16)
    with torch.no_grad():
        logits = model(x)
    return {"path": path, "sha256": digest, "x": x, "logits": logits}


class Zoo:
    """The temporary registry, package folder and ZOO_HOME of one test."""

    def __init__(self, root: Path, published: dict, monkeypatch: pytest.MonkeyPatch) -> None:
        self.published = published
        self.package = root / "package"
        self.package.mkdir()
        self.home = root / "home"
        self.serve_dir = root / "srv"
        self.serve_dir.mkdir()
        self.file = published["path"].name
        self.data = published["path"].read_bytes()
        (self.serve_dir / self.file).write_bytes(self.data)
        monkeypatch.setattr(hub, "PACKAGE_DIR", self.package)
        monkeypatch.setattr(hub, "REGISTRY_FILE", self.package / "registry.json")
        monkeypatch.setenv("ZOO_HOME", str(self.home))
        monkeypatch.delenv("ZOO_OFFLINE", raising=False)
        monkeypatch.delenv("ZOO_CHECKPOINT_MIRROR", raising=False)
        self.set_urls([])

    def set_urls(self, urls: list[str]) -> None:
        entry = {
            "name": NAME,
            "task": "classification",
            "method": "Supervised",
            "architecture": ARCH,
            "dataset": "digits",
            "metrics": {"val_acc": 0.5},
            "input_size": [1, 16, 16],
            "mean": [0.3],
            "std": [0.3],
            "sha256": self.published["sha256"],
            "file_size": len(self.data),
            "file": self.file,
            "urls": urls,
            "license": "Apache-2.0",
            "config": "configs/classification/digits/baseline.yaml",
            "command": "test",
        }
        (self.package / "registry.json").write_text(json.dumps([entry]))

    @property
    def cached(self) -> Path:
        return self.home / "checkpoints" / self.file

    def cache_listing(self) -> list[str]:
        folder = self.home / "checkpoints"
        return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


@pytest.fixture
def zoo(tmp_path: Path, published: dict, monkeypatch: pytest.MonkeyPatch) -> Zoo:
    return Zoo(tmp_path, published, monkeypatch)


def test_cache_folder_follows_zoo_home(zoo, monkeypatch):
    assert hub.zoo_home() == zoo.home and hub.cache_dir() == zoo.home / "checkpoints"
    monkeypatch.delenv("ZOO_HOME")
    assert hub.zoo_home() == Path("~/.cache/distill-zoo").expanduser()
    assert [e["name"] for e in hub.list_checkpoints("tiny-*")] == [NAME]


def test_http_download_then_cache_hit_makes_no_request(zoo, serve):
    server = serve(zoo.serve_dir)
    zoo.set_urls([f"{server.url}/{zoo.file}"])
    path = hub.download(NAME)
    assert path == zoo.cached and path.read_bytes() == zoo.data
    assert server.requests == [f"/{zoo.file}"]
    assert zoo.cache_listing() == [zoo.file]  # no temp file left beside it
    server.stop()
    assert hub.download(NAME) == zoo.cached and hub.download(NAME) == zoo.cached
    assert server.requests == [f"/{zoo.file}"]


def test_hash_mismatch_names_both_hashes_and_leaves_nothing(zoo, serve):
    bad = bytearray(zoo.data)
    bad[len(bad) // 2] ^= 0x01
    (zoo.serve_dir / zoo.file).write_bytes(bytes(bad))
    server = serve(zoo.serve_dir)
    zoo.set_urls([f"{server.url}/{zoo.file}"])
    actual = hashlib.sha256(bytes(bad)).hexdigest()
    with pytest.raises(hub.DownloadError) as info:
        hub.download(NAME)
    message = str(info.value)
    assert f"expected {zoo.published['sha256']}" in message and f"got {actual}" in message
    assert server.url in message
    (failure,) = [err for _, err in info.value.failures]
    assert isinstance(failure, hub.ChecksumError) and failure.actual == actual
    assert zoo.cache_listing() == []


def test_interrupted_transfer_raises_and_leaves_nothing(zoo, serve):
    server = serve(zoo.serve_dir, truncate=True)
    zoo.set_urls([f"{server.url}/{zoo.file}"])
    with pytest.raises(hub.DownloadError, match=rf"incomplete transfer: got {len(zoo.data) // 2} of {len(zoo.data)}"):
        hub.download(NAME)
    assert zoo.cache_listing() == []
    # the same failure through the low-level function, with no registry size to compare: Content-Length catches it
    with pytest.raises(hub.DownloadError, match="incomplete transfer"):
        hub.download_url_to_file(f"{server.url}/{zoo.file}", zoo.home / "x" / zoo.file, zoo.published["sha256"])
    assert list((zoo.home / "x").iterdir()) == []


def test_mirror_is_tried_before_the_entry_urls(zoo, serve, monkeypatch):
    server = serve(zoo.serve_dir)
    zoo.set_urls([f"{dead_url()}/{zoo.file}"])
    monkeypatch.setenv("ZOO_CHECKPOINT_MIRROR", server.url + "/")
    assert hub.checkpoint_urls(hub.get_entry(NAME))[0] == f"{server.url}/{zoo.file}"
    assert hub.download(NAME).read_bytes() == zoo.data
    assert server.requests == [f"/{zoo.file}"]


def test_next_url_after_a_failure_and_all_failures_reported(zoo, serve):
    server = serve(zoo.serve_dir)
    dead = f"{dead_url()}/{zoo.file}"
    missing = f"{server.url}/nothing-here.safetensors"
    zoo.set_urls([dead, missing, f"{server.url}/{zoo.file}"])
    assert hub.download(NAME).read_bytes() == zoo.data
    zoo.cached.unlink()
    zoo.set_urls([dead, missing])
    with pytest.raises(hub.DownloadError) as info:
        hub.download(NAME)
    message = str(info.value)
    assert dead in message and "cannot connect" in message
    assert missing in message and "HTTP 404" in message
    assert [url for url, _ in info.value.failures] == [dead, missing]
    assert zoo.cache_listing() == []


def test_wrong_content_length_fails_before_streaming(zoo, serve):
    (zoo.serve_dir / zoo.file).write_bytes(zoo.data + b"x")
    server = serve(zoo.serve_dir)
    zoo.set_urls([f"{server.url}/{zoo.file}"])
    with pytest.raises(hub.DownloadError, match=f"announces {len(zoo.data) + 1} bytes but the registry expects"):
        hub.download(NAME)
    assert zoo.cache_listing() == []


def test_offline_uses_the_cache_and_names_what_is_missing(zoo, serve, monkeypatch):
    server = serve(zoo.serve_dir)
    zoo.set_urls([f"{server.url}/{zoo.file}"])
    monkeypatch.setenv("ZOO_OFFLINE", "1")
    with pytest.raises(FileNotFoundError) as info:
        hub.download(NAME)
    assert "ZOO_OFFLINE" in str(info.value) and NAME in str(info.value) and str(zoo.cached) in str(info.value)
    assert server.requests == []
    monkeypatch.setenv("ZOO_OFFLINE", "0")
    hub.download(NAME)
    monkeypatch.setenv("ZOO_OFFLINE", "1")
    assert hub.download(NAME) == zoo.cached
    assert len(server.requests) == 1
    monkeypatch.setenv("ZOO_OFFLINE", "maybe")
    with pytest.raises(ValueError, match="ZOO_OFFLINE='maybe'"):
        hub.download(NAME)


def test_offline_corrupt_cache_raises_naming_the_file(zoo, monkeypatch):
    zoo.cached.parent.mkdir(parents=True)
    zoo.cached.write_bytes(zoo.data[:-1] + bytes([zoo.data[-1] ^ 0xFF]))
    monkeypatch.setenv("ZOO_OFFLINE", "1")
    with pytest.raises(hub.ChecksumError) as info:
        hub.download(NAME)
    assert str(zoo.cached) in str(info.value) and "ZOO_OFFLINE" in str(info.value)
    assert f"expected {zoo.published['sha256']}" in str(info.value)


def test_corrupt_cache_is_removed_and_downloaded_again(zoo, serve):
    server = serve(zoo.serve_dir)
    zoo.set_urls([f"{server.url}/{zoo.file}"])
    zoo.cached.parent.mkdir(parents=True)
    zoo.cached.write_bytes(zoo.data[:-1] + bytes([zoo.data[-1] ^ 0xFF]))  # same size, wrong hash
    assert hub.download(NAME).read_bytes() == zoo.data
    zoo.cached.write_bytes(zoo.data[:100])  # truncated: caught by the size check
    assert hub.download(NAME).read_bytes() == zoo.data
    assert len(server.requests) == 2 and zoo.cache_listing() == [zoo.file]


def test_file_url(zoo, monkeypatch):
    zoo.set_urls([(zoo.serve_dir / zoo.file).as_uri()])
    assert hub.download(NAME).read_bytes() == zoo.data
    zoo.cached.unlink()
    zoo.set_urls([(zoo.serve_dir / "missing.safetensors").as_uri()])
    with pytest.raises(hub.DownloadError, match="missing.safetensors"):
        hub.download(NAME)
    # a mirror may be a plain folder (air-gapped sites): it becomes a file:// URL
    monkeypatch.setenv("ZOO_CHECKPOINT_MIRROR", str(zoo.serve_dir))
    assert hub.download(NAME).read_bytes() == zoo.data


def test_hf_url_goes_through_hf_hub_download(zoo, monkeypatch):
    import huggingface_hub

    calls = []

    def fake_hf_hub_download(repo_id, filename, revision=None, **kwargs):
        calls.append((repo_id, filename, revision))
        return str(zoo.serve_dir / zoo.file)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_hf_hub_download)
    zoo.set_urls([f"hf://distill-zoo/checkpoints/digits/{zoo.file}@v1.0"])
    assert hub.download(NAME) == zoo.cached and zoo.cached.read_bytes() == zoo.data
    assert calls == [("distill-zoo/checkpoints", f"digits/{zoo.file}", "v1.0")]
    assert (zoo.serve_dir / zoo.file).exists()  # copied out of the Hugging Face cache, not moved

    zoo.cached.unlink()
    (zoo.serve_dir / zoo.file).write_bytes(zoo.data[:-1] + b"\0")
    zoo.set_urls([f"hf://distill-zoo/checkpoints/{zoo.file}"])
    with pytest.raises(hub.DownloadError, match="sha256 mismatch"):
        hub.download(NAME)
    assert calls[-1] == ("distill-zoo/checkpoints", zoo.file, None)
    assert zoo.cache_listing() == []

    def offline_hub(**kwargs):
        raise OSError("no connection")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline_hub)
    with pytest.raises(hub.DownloadError, match="Hugging Face Hub download failed: OSError: no connection"):
        hub.download(NAME)


def test_malformed_and_unsupported_urls_are_named(zoo):
    zoo.set_urls(["hf://only-org", "ftp://example.invalid/x.safetensors"])
    with pytest.raises(hub.DownloadError) as info:
        hub.download(NAME)
    assert "hf://only-org: expected hf://org/repo/path/in/repo[@revision]" in str(info.value)
    assert "unsupported URL scheme 'ftp'" in str(info.value)
    zoo.set_urls([])
    with pytest.raises(FileNotFoundError, match="lists no urls.*ZOO_CHECKPOINT_MIRROR"):
        hub.download(NAME)


def test_shipped_file_is_used_in_place_without_download(zoo, serve):
    server = serve(zoo.serve_dir)
    zoo.set_urls([f"{server.url}/{zoo.file}"])
    (zoo.package / zoo.file).write_bytes(zoo.data)
    assert hub.download(NAME) == zoo.package / zoo.file
    assert server.requests == [] and zoo.cache_listing() == []
    target = hub.download(NAME, dir=zoo.home / "copy")
    assert target == zoo.home / "copy" / zoo.file and target.read_bytes() == zoo.data
    assert server.requests == []


def test_download_to_dir(zoo, serve):
    server = serve(zoo.serve_dir)
    zoo.set_urls([f"{server.url}/{zoo.file}"])
    out = zoo.home.parent / "weights"
    path = hub.download(NAME, dir=out)
    assert path == out / zoo.file and path.read_bytes() == zoo.data
    assert zoo.cached.read_bytes() == zoo.data  # downloaded into the cache, then copied
    assert sorted(p.name for p in out.iterdir()) == [zoo.file]
    assert hub.download(NAME, dir=out) == path and len(server.requests) == 1
    path.write_bytes(b"broken")  # a bad copy in the target folder is replaced by a verified one
    assert hub.download(NAME, dir=out).read_bytes() == zoo.data
    assert sorted(p.name for p in out.iterdir()) == [zoo.file]


def test_cli_download_and_verify(zoo, serve, capsys):
    server = serve(zoo.serve_dir)
    zoo.set_urls([f"{server.url}/{zoo.file}"])
    assert checkpoints_main(["download", NAME]) == 0
    assert capsys.readouterr().out.strip() == str(zoo.cached)
    out = zoo.home.parent / "cli-out"
    assert checkpoints_main(["download", NAME, "--dir", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out / zoo.file)
    assert checkpoints_main(["download", "no-such-checkpoint"]) == 1
    assert "no published checkpoint named 'no-such-checkpoint'" in capsys.readouterr().err

    assert checkpoints_main(["verify", str(out / zoo.file)]) == 0
    assert f"OK, {NAME}" in capsys.readouterr().out
    bad = zoo.home.parent / "bad" / zoo.file
    bad.parent.mkdir()
    bad.write_bytes(zoo.data[:-1] + bytes([zoo.data[-1] ^ 0xFF]))
    actual = hub.sha256_file(bad)
    assert checkpoints_main(["verify", str(bad)]) == 1
    assert f"sha256 {actual} is not the registry's {zoo.published['sha256']}" in capsys.readouterr().err
    stranger = zoo.home.parent / "bad" / "unknown-0123abcd.safetensors"
    stranger.write_bytes(b"x")
    assert checkpoints_main(["verify", str(stranger)]) == 1
    assert "matches no registry entry" in capsys.readouterr().err


def test_cli_download_reports_failures(zoo, capsys, monkeypatch):
    monkeypatch.setenv("ZOO_OFFLINE", "1")
    assert checkpoints_main(["download", NAME]) == 1
    err = capsys.readouterr().err
    assert "ZOO_OFFLINE" in err and str(zoo.cached) in err


def test_load_of_downloaded_entry_predicts_like_the_original(zoo, serve, published):
    server = serve(zoo.serve_dir)
    zoo.set_urls([f"{server.url}/{zoo.file}"])
    model, meta = hub.load(NAME)
    assert not model.training and meta["input_size"] == [1, 16, 16] and meta["mean"] == [0.3]
    with torch.no_grad():
        torch.testing.assert_close(model(published["x"]), published["logits"])
    built = hub.Pretrained(NAME).build(num_classes=10, in_chans=1)
    with torch.no_grad():
        torch.testing.assert_close(built(published["x"]), published["logits"])
    assert len(server.requests) == 1  # the second load came from the cache
