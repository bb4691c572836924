import os

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "offline")
# ZOO_TEST_THREADS=1 keeps parallel test runs on this 2-core machine from oversubscribing the cores.
torch.set_num_threads(int(os.environ.get("ZOO_TEST_THREADS", max(1, min(2, os.cpu_count() or 1)))))

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def root() -> str:
    return ROOT
