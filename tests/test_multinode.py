"""A K=2 calibration across two "nodes" of one CPU process each, launched the way Lightning's multi-node
environment expects (``LightningEnvironment``: MASTER_ADDR / MASTER_PORT / NODE_RANK, one process started by hand per
node, no LOCAL_RANK so each node's launcher starts its own ranks), sharing the run folder as nodes share a
filesystem: its outputs equal a sequential run's, and each node's terminal stays free of Lightning's set-up lines."""
from __future__ import annotations

import socket

import pytest

from mmqdiff.lightning import LOG_NAME
from mmqdiff.segments.run_folder import read_manifest

from .test_calibrate import args, artefacts, finish, run_cli, tensors_equal, world  # noqa: F401  (world: fixture)

K, ITERS, ITERS_A = 2, 12, 6
BANNERS = ("GPU available", "TPU available", "Initializing distributed", "distributed_backend=gloo")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_nodes_equal_sequential(world, tmp_path):  # noqa: F811
    sequential, run_dir = tmp_path / "sequential", tmp_path / "nodes"
    finish(run_cli(args(world, sequential, k=K, iters=ITERS, iters_a=ITERS_A)))
    node_args = args(world, run_dir, k=K, iters=ITERS, iters_a=ITERS_A,
                     extra=["--trainer.num_nodes", "2", "--trainer.devices", "1",
                            "--trainer.strategy", "segment_parallel"])
    port = str(free_port())
    nodes = [run_cli(node_args, env_extra={"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "NODE_RANK": str(rank),
                                           "WORLD_SIZE": "2"})
             for rank in (0, 1)]
    outs = [finish(node, timeout=300) for node in nodes]

    manifest, seq = read_manifest(run_dir), read_manifest(sequential)
    assert manifest["world_size"] == 2 and [s["rank"] for s in manifest["segments"]] == [0, 1], outs[0][-2000:]
    # the files' bytes differ run to run (torch.save writes a random serialization id), their contents may not
    assert ([s["content_sha256"] for s in manifest["segments"]] == [s["content_sha256"] for s in seq["segments"]])
    assert [s["model_bytes"] for s in manifest["segments"]] == [s["model_bytes"] for s in seq["segments"]]
    for a, b in zip(artefacts(run_dir, K), artefacts(sequential, K)):
        assert tensors_equal(a, b)

    log = (run_dir / LOG_NAME).read_text()
    for banner in BANNERS:
        assert banner in log
        assert not [out for out in outs if banner in out], banner
    assert log.count("Initializing distributed: GLOBAL_RANK") == 2  # one line per node
