"""``segment_parallel``: K independent segment calibrations spread over N processes.

Each rank calibrates its own segments; nothing is averaged, so the module is not wrapped in
DistributedDataParallel (which would also refuse a module without parameters). The process group is used only for
the collectives of checkpointing and the final outputs. Select it with ``trainer.strategy: segment_parallel`` and
``trainer.devices: N`` (GPUs, or CPU processes with gloo); multi-node runs add ``trainer.num_nodes`` under any
launcher Lightning supports (torchrun, SLURM), the run folder on a shared filesystem.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence, TypeVar

import torch.distributed as dist
from lightning.pytorch.strategies import DDPStrategy, Strategy, StrategyRegistry

T = TypeVar("T")


class SegmentParallelStrategy(DDPStrategy):
    """DDP process management without gradient synchronisation; every rank sees every work item."""

    strategy_name = "segment_parallel"

    def configure_ddp(self) -> None:
        """No DistributedDataParallel wrapper: ranks train disjoint models."""

    @property
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        """Each rank iterates all work items (for its own segments), so the sampler must not shard them."""
        return {"num_replicas": 1, "rank": 0}


def segments_of_rank(k: int, rank: int, world_size: int, costs: Sequence[float] | None = None) -> list[int]:
    """The segments rank r calibrates, balancing the ranks' work: segments in order of decreasing cost (then index),
    each to the rank with the least cost so far (then the lowest rank). With equal costs (the default) that is
    round-robin, rank r getting r, r + N, r + 2N, ...; with a front-loaded ``segment_scale`` [2, 1, 0.5, 0.5] on two
    ranks it is {0} and {1, 2, 3} (2 and 2) instead of {0, 2} and {1, 3} (2.5 and 1.5). A pure function of its
    arguments, so a resumed run may use a different N."""
    costs = [1.0] * k if costs is None else [float(c) for c in costs]
    if len(costs) != k:
        raise ValueError(f"{len(costs)} segment costs for k={k} segments")
    load, owner = [0.0] * world_size, {}
    for s in sorted(range(k), key=lambda s: (-costs[s], s)):
        owner[s] = min(range(world_size), key=lambda r: (load[r], r))
        load[owner[s]] += costs[s]
    return [s for s in range(k) if owner[s] == rank]


def gather_to_zero(obj: T) -> list[T] | None:
    """Every rank's ``obj`` on rank 0 (in rank order), None elsewhere; ``[obj]`` without a process group."""
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out: list[T] | None = [None] * dist.get_world_size() if dist.get_rank() == 0 else None  # type: ignore[list-item]
    dist.gather_object(obj, out, dst=0)
    return out


def decided_by_zero(strategy: Strategy, decide: Callable[[], T]) -> T:
    """``decide()`` on global rank 0 only, its result (or the exception it raised) on every rank: the ranks of one
    run act on one decision and fail together instead of hanging at the next collective."""
    result: Any = None
    error: BaseException | None = None
    if strategy.is_global_zero:
        try:
            result = decide()
        except Exception as e:  # noqa: BLE001 -- re-raised on every rank below
            error = e
    result, error = strategy.broadcast((result, error))
    if error is not None:
        raise error
    return result


StrategyRegistry.register(SegmentParallelStrategy.strategy_name, SegmentParallelStrategy,
                          description="one process per device, each calibrating its own segments",
                          start_method="popen")
