from __future__ import annotations

import fcntl
import json
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest
import torch

from mmqdiff.diffusion import Model

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(ch=32, out_ch=3, ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[4], dropout=0.0, in_channels=3,
            resolution=8, resamp_with_conv=True)


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """The tests use small models: a second OpenMP thread gains little, and on a busy 2-core machine its spin-waits
    made files up to 15x slower (measured 64 s vs 3.5 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny_model() -> Model:
    torch.manual_seed(0)
    return Model(**TINY).eval()


@contextmanager
def foreign_lock(path: Path) -> Iterator[None]:
    """``path`` held the way another live run holds its lock file: an exclusive flock on a file naming its owner."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        f.write(json.dumps({"pid": 4242, "host": "elsewhere", "started": "earlier", "command": "cli.py fit"}))
        f.flush()
        fcntl.flock(f, fcntl.LOCK_EX)
        yield
