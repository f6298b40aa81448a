"""mmqdiff.quant.allocator: glibc's malloc keeps freed temporaries for reuse (checked through glibc's own counters in a
fresh interpreter, so the test process's allocator is left alone)."""
import json
import os
import subprocess
import sys

import pytest

from .conftest import ROOT

PROBE = """
import ctypes, json
import torch
from mmqdiff.quant.allocator import keep_freed_memory

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
                                               "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
applied = keep_freed_memory()
before = libc.mallinfo2()
x = torch.empty(16 << 20, dtype=torch.uint8)  # a 16 MiB temporary, as big as the embedded model's largest
mmapped = libc.mallinfo2().hblkhd - before.hblkhd
del x
print(json.dumps({"applied": applied, "mmapped": mmapped, "heap_growth": libc.mallinfo2().arena - before.arena}))
"""


def probe(env: dict[str, str]) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, env=env, capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_freed_memory_is_kept_on_the_heap():
    env = {k: v for k, v in os.environ.items() if k != "MMQDIFF_MALLOC_TUNING"}
    tuned = probe(env)
    assert tuned["applied"] and tuned["mmapped"] == 0  # served from the heap, not a fresh mmap
    assert tuned["heap_growth"] > 8 << 20  # and still held after the free: the next step reuses it
    default = probe({**env, "MMQDIFF_MALLOC_TUNING": "0"})  # the opt-out leaves glibc's defaults
    assert not default["applied"] and default["mmapped"] >= 16 << 20 and default["heap_growth"] < 8 << 20
