"""Atomic writes that name their target, and the run lock (held, stale, released)."""
from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import subprocess
import sys

import pytest
import torch

from mmqdiff.io import RunLock, RunLockedError, atomic_save, atomic_write_text, check_writable, keep_previous

from .conftest import ROOT


def test_failed_torch_save_names_the_target(tmp_path):
    target = tmp_path / "sub" / "model.pt"
    target.parent.mkdir()
    (target.parent / f".model.pt.tmp{os.getpid()}").mkdir()  # the temporary file cannot be opened
    with pytest.raises(OSError, match=f"cannot write {target} "):
        atomic_save({"a": torch.zeros(2)}, target)
    assert not target.exists()


def test_write_into_a_file_names_the_target(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OSError, match=f"cannot write {blocker / 'out.txt'}"):
        atomic_write_text(blocker / "out.txt", "hello")
    with pytest.raises(PermissionError, match=f"output folder {blocker / 'run'} is not writable"):
        check_writable(blocker / "run")


def test_keep_previous_copies_without_removing_the_original(tmp_path):
    last = atomic_write_text(tmp_path / "last.ckpt", "one")
    keep_previous(last, tmp_path / "previous.ckpt")
    atomic_write_text(last, "two")
    assert (tmp_path / "previous.ckpt").read_text() == "one" and last.read_text() == "two"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt", "previous.ckpt"]


def held_by_other_process(path):
    """A child process that holds ``path``'s lock until killed (started and verified before returning)."""
    code = ("import sys, time; from mmqdiff.io import RunLock; RunLock(sys.argv[1], 'x').acquire(); "
            "print('locked', flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(path)], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_lock_held_by_a_live_process_is_refused_with_its_owner(tmp_path):
    path = tmp_path / "run" / "mmqdiff.lock"
    proc = held_by_other_process(path)
    try:
        with pytest.raises(RunLockedError, match=rf"calibration run folder x is in use by pid {proc.pid} on host "
                                                 rf"{socket.gethostname()} .*lock file {path}"):
            RunLock(path, "calibration run folder x").acquire()
    finally:
        proc.kill()
        proc.wait()
    # the owner died without releasing: its lock is stale, reported and taken over
    lock = RunLock(path, "x").acquire()
    assert json.loads(path.read_text())["pid"] == os.getpid()
    lock.release()
    assert not path.exists()


def test_stale_lock_is_reported_and_taken_over(tmp_path, caplog):
    path = tmp_path / "mmqdiff.lock"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    path.write_text(json.dumps({"pid": int(dead.stdout), "host": socket.gethostname(), "started": "earlier",
                                "command": "cli.py fit"}))
    with caplog.at_level(logging.WARNING, logger="mmqdiff.io"), RunLock(path, "x"):
        assert json.loads(path.read_text())["pid"] == os.getpid()
    assert f"taking over a stale lock left by pid {int(dead.stdout)} on host {socket.gethostname()}" in caplog.text
    assert not path.exists()


def test_second_holder_in_one_process_is_refused_until_release(tmp_path):
    path = tmp_path / "mmqdiff.lock"
    first = RunLock(path, "folder").acquire()
    with pytest.raises(RunLockedError, match=f"pid {os.getpid()}"):
        RunLock(path, "folder").acquire()
    first.release()
    RunLock(path, "folder").acquire().release()


def test_lock_is_a_real_flock(tmp_path):
    """Other tools (and the tests of the stages) see the lock through flock on the file."""
    path = tmp_path / "mmqdiff.lock"
    with RunLock(path, "x"):
        with open(path) as f, pytest.raises(BlockingIOError):
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
