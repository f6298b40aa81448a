from __future__ import annotations

import torch

from mmqdiff.data.synthetic import NUM_CLASSES, SyntheticDataModule, make_synthetic_images


def test_reproducible_and_prefix_stable():
    a, la = make_synthetic_images(300, 16, seed=3)
    b, lb = make_synthetic_images(300, 16, seed=3)
    c, lc = make_synthetic_images(40, 16, seed=3)
    assert torch.equal(a, b) and torch.equal(la, lb)
    assert torch.equal(a[:40], c) and torch.equal(la[:40], lc)
    assert not torch.equal(a[:40], make_synthetic_images(40, 16, seed=4)[0])


def test_range_classes_and_sizes():
    x, y = make_synthetic_images(800, 32, seed=0)
    assert x.shape == (800, 3, 32, 32) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1
    assert set(y.tolist()) == set(range(NUM_CLASSES))
    assert x.std() > 0.2  # images are not flat


def test_datamodule_batches():
    dm = SyntheticDataModule(num_train=64, num_val=16, batch_size=32)
    dm.setup("fit")
    xb, yb = next(iter(dm.train_dataloader()))
    assert xb.shape == (32, 3, 16, 16) and yb.dtype == torch.long
