"""Cutting the sampling steps into K contiguous segments, one quantized model each.

Everything here counts *step indices* (0 = first, noisiest step), so calibration (which selects pairs per segment) and
sampling (which picks the model for step i) share one definition and cannot disagree.
"""
from __future__ import annotations

import itertools
import math
from typing import Sequence


def timestep_segments(num_steps: int, k: int, boundaries: Sequence[int] | None = None) -> list[range]:
    """K contiguous ranges of step indices covering ``range(num_steps)`` in sampling order.

    Without ``boundaries`` the split is equal in step count; the remainder goes to the earlier segments (they
    get one step more). ``boundaries`` are the K-1 *cut points*: ``boundaries[j]`` is the first step index of
    segment j+1, so they must be strictly increasing and inside ``[1, num_steps - 1]``; 0 and ``num_steps`` are
    implied.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if k < 1:
        raise ValueError(f"number of segments k must be >= 1, got {k}")
    if k > num_steps:
        raise ValueError(f"number of segments k={k} exceeds the number of sampling steps {num_steps}")
    if boundaries is None:
        q, r = divmod(num_steps, k)
        sizes = [q + 1] * r + [q] * (k - r)
        boundaries = [sum(sizes[:j + 1]) for j in range(k - 1)]
    else:
        boundaries = [int(b) for b in boundaries]
        if len(boundaries) != k - 1:
            raise ValueError(f"boundaries {boundaries} must hold k-1={k - 1} cut points (first step of segments "
                             f"1..k-1), got {len(boundaries)}")
        for b in boundaries:
            if not 1 <= b <= num_steps - 1:
                raise ValueError(f"boundary {b} is outside [1, {num_steps - 1}] for {num_steps} steps")
        for a, b in zip(boundaries, boundaries[1:]):
            if b <= a:
                raise ValueError(f"boundaries {boundaries} must be strictly increasing (got {a} then {b}): "
                                 "segments would overlap or be empty")
    edges = [0, *boundaries, num_steps]
    return [range(a, b) for a, b in zip(edges, edges[1:])]


def segment_of_step(segments: Sequence[range]) -> list[int]:
    """``out[i]`` is the index of the segment holding step i; checks that the segments tile ``0..n-1`` in order."""
    out: list[int] = []
    for s, seg in enumerate(segments):
        if seg.step != 1 or len(seg) == 0 or seg.start != len(out):
            raise ValueError(f"segment {s} = {seg} does not continue the contiguous cover at step {len(out)}")
        out.extend([s] * len(seg))
    if not out:
        raise ValueError("no segments given")
    return out


def equal_share_boundaries(weights: Sequence[float], k: int) -> list[int]:
    """The K-1 cut points that give each of ``k`` contiguous segments of ``len(weights)`` steps as equal a share of
    the total weight as whole steps allow: cut j is the first step at which the running sum reaches j/k of the total
    (then pushed right as needed so that every segment keeps at least one step). With the per-step sample-space
    damage of a K=1 model as weights (``evaluation.damage_boundaries``), each segment model answers for an equal
    share of the error the sample sees, instead of an equal number of steps."""
    n = len(weights)
    if k < 1 or k > n:
        raise ValueError(f"k={k} segments need 1 <= k <= {n} (the number of steps)")
    if any(not math.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError("weights must be finite, non-negative and not all zero")
    running = list(itertools.accumulate(float(w) for w in weights))
    cuts: list[int] = []
    for j in range(1, k):
        first = next(i + 1 for i, c in enumerate(running) if c >= running[-1] * j / k)  # step after the crossing
        lowest, highest = (cuts[-1] + 1 if cuts else 1), n - (k - j)  # room for one step per remaining segment
        cuts.append(min(max(first, lowest), highest))
    return cuts
