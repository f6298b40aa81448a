import pytest

from mmqdiff.data import equal_share_boundaries, segment_of_step, timestep_segments
from mmqdiff.lightning.strategy import segments_of_rank


def test_equal_split():
    assert timestep_segments(100, 4) == [range(0, 25), range(25, 50), range(50, 75), range(75, 100)]
    assert timestep_segments(100, 1) == [range(0, 100)]
    assert timestep_segments(3, 3) == [range(0, 1), range(1, 2), range(2, 3)]


def test_remainder_goes_to_earlier_segments():
    segs = timestep_segments(10, 3)
    assert [len(s) for s in segs] == [4, 3, 3]
    assert segs == [range(0, 4), range(4, 7), range(7, 10)]
    assert [len(s) for s in timestep_segments(101, 4)] == [26, 25, 25, 25]


def test_boundaries_are_cut_points():
    assert timestep_segments(100, 3, [10, 50]) == [range(0, 10), range(10, 50), range(50, 100)]
    assert timestep_segments(5, 2, [4]) == [range(0, 4), range(4, 5)]


@pytest.mark.parametrize("num_steps, k, boundaries, match", [
    (100, 0, None, "k must be >= 1, got 0"),
    (100, -2, None, "got -2"),
    (10, 11, None, "k=11 exceeds the number of sampling steps 10"),
    (0, 1, None, "num_steps must be >= 1, got 0"),
    (100, 3, [50, 10], r"strictly increasing \(got 50 then 10\)"),
    (100, 3, [10, 10], r"got 10 then 10"),
    (100, 2, [0], "boundary 0 is outside"),
    (100, 2, [100], r"boundary 100 is outside \[1, 99\]"),
    (100, 3, [10], "k-1=2 cut points"),
])
def test_invalid_specs(num_steps, k, boundaries, match):
    with pytest.raises(ValueError, match=match):
        timestep_segments(num_steps, k, boundaries)


def test_segment_of_step():
    segs = timestep_segments(10, 3)
    owner = segment_of_step(segs)
    assert owner == [0, 0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert all(i in segs[owner[i]] for i in range(10))


@pytest.mark.parametrize("segs", [[range(0, 4), range(5, 10)], [range(0, 4), range(3, 10)], [range(1, 4)],
                                  [range(0, 4), range(4, 4)], []])
def test_segment_of_step_rejects_non_cover(segs):
    with pytest.raises(ValueError):
        segment_of_step(segs)


@pytest.mark.parametrize("weights, k, cuts", [
    ([1.0] * 100, 4, [25, 50, 75]),                 # uniform weights: the equal split
    ([4, 1, 1, 1, 1], 2, [1]),                      # step 0 alone holds half the total
    ([1, 1, 1, 1, 4], 2, [4]),                      # the last step holds half: the first four steps share the rest
    ([3, 0, 0, 1, 2, 0], 3, [1, 4]),                # running 3,3,3,4,6,6 reaches 2 at step 0 and 4 at step 3
    ([10, 0, 0, 0, 0, 0], 4, [1, 2, 3]),            # every share is reached at step 0: pushed right, one step each
    ([0, 0, 0, 0, 0, 10], 3, [4, 5]),               # reached only at the last step: pushed left to leave it one step
])
def test_equal_share_boundaries_by_hand(weights, k, cuts):
    assert equal_share_boundaries(weights, k) == cuts
    timestep_segments(len(weights), k, cuts)  # valid cut points


@pytest.mark.parametrize("weights, k, match", [
    ([1.0, 2.0], 3, r"k=3 segments need 1 <= k <= 2"),
    ([0.0, 0.0], 1, "not all zero"),
    ([1.0, -1.0, 3.0], 2, "non-negative"),
    ([1.0, float("nan")], 2, "finite"),
])
def test_equal_share_boundaries_refuses(weights, k, match):
    with pytest.raises(ValueError, match=match):
        equal_share_boundaries(weights, k)


@pytest.mark.parametrize("k, world, costs, expected", [
    (4, 2, None, [[0, 2], [1, 3]]),                               # equal costs: round-robin
    (5, 2, [1.0] * 5, [[0, 2, 4], [1, 3]]),
    (4, 2, [2, 1, 0.5, 0.5], [[0], [1, 2, 3]]),                   # 2 and 2 instead of round-robin's 2.5 and 1.5
    (4, 3, [0.5, 0.5, 1, 2], [[3], [2], [0, 1]]),                 # costliest first, each to the least-loaded rank
    (3, 4, None, [[0], [1], [2], []]),                            # more ranks than segments: one idles
])
def test_segments_of_rank_balances_the_costs(k, world, costs, expected):
    assert [segments_of_rank(k, r, world, costs) for r in range(world)] == expected


def test_segments_of_rank_needs_one_cost_per_segment():
    with pytest.raises(ValueError, match="3 segment costs for k=4 segments"):
        segments_of_rank(4, 0, 2, [1, 1, 1])
