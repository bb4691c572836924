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


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
    gc.collect()
    if _LIBC is not None:
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
