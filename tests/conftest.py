import ctypes
import functools
import gc
import os
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "offline")
# ZOO_TEST_THREADS=1 keeps parallel test runs on this 2-core machine from oversubscribing the cores.
torch.set_num_threads(int(os.environ.get("ZOO_TEST_THREADS", max(1, min(2, os.cpu_count() or 1)))))

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


try:  # glibc: hands freed heap back to the OS, so one test's large models do not stay in the process's RSS
    _LIBC = ctypes.CDLL("libc.so.6")
    _LIBC.malloc_trim.argtypes = [ctypes.c_size_t]
except (OSError, AttributeError):
    _LIBC = None


#: RSS above which the freed heap is handed back to the OS after a test
_TRIM_ABOVE = 1024 * 2**20
#: growth of the RSS during a test above which its garbage is collected at once (a collection costs ~0.1 s)
_GREW = 32 * 2**20


def _rss() -> int:
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0


#: every ZooCLI a test built: jsonargparse's instantiators keep the last CLI (its trainer and models) reachable until
#: the next one is built, so each test's CLIs drop their objects when it ends
_CLIS: list = []


def pytest_sessionstart(session):
    import zoo.cli

    build = zoo.cli.ZooCLI.__init__

    @functools.wraps(build)
    def recorded(self, *args, **kwargs):
        _CLIS.append(self)
        build(self, *args, **kwargs)

    zoo.cli.ZooCLI.__init__ = recorded

    # The libraries the tests import stay alive for the whole run: move their objects out of the garbage
    # collector's reach once, so that collecting after each test scans the tests' own objects only.
    import lightning  # noqa: F401
    import timm  # noqa: F401
    import torchvision  # noqa: F401

    gc.collect()
    gc.freeze()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    before = _rss()
    yield
    built_a_cli = bool(_CLIS)
    for cli in _CLIS:
        cli.__dict__.clear()
    _CLIS.clear()
    if built_a_cli or _rss() - before > _GREW:
        gc.collect()  # a test's models often sit in reference cycles (modules, hooks, trainers): free them now
        if _LIBC is not None and _rss() > _TRIM_ABOVE:
            _LIBC.malloc_trim(0)


@pytest.fixture
def root() -> str:
    return ROOT


@pytest.fixture
def serve_folder():
    """Serves folders over HTTP on 127.0.0.1 for one test: ``serve_folder(path)`` returns the base URL; every
    server is shut down at teardown."""
    servers = []

    def start(directory) -> str:
        handler = functools.partial(SimpleHTTPRequestHandler, directory=str(directory))
        server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        servers.append((server, thread))
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield start
    for server, thread in servers:
        server.shutdown()
        thread.join()
        server.server_close()
