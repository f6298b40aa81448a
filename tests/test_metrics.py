"""FID/KID/IS wiring, the float64 reference FID, reference-image sources and caching, PSNR and per-step MSE."""
from __future__ import annotations

import math
import pickle

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.utils import save_image

from mmqdiff.data.synthetic import make_synthetic_images
from mmqdiff.evaluation.features import SmallClassifier
from mmqdiff.evaluation.features import (INCEPTION_WEIGHTS_NAME, ClassifierExtractor, FeatureExtractor,
                                         InceptionExtractor)
from mmqdiff.evaluation.fidelity import psnr, psnr_per_image, squared_error
from mmqdiff.evaluation import metrics as image_metrics
from mmqdiff.evaluation.metrics import build_metrics, score_images
from mmqdiff.evaluation.real_images import load_real_images, to_uint8

from .fid_reference import frechet_distance, gaussian_stats


class Projection(FeatureExtractor):
    """Fixed random projection of 8x8 pixels: features [N, 16], logits [N, 10] (all-zero if head_scale=0)."""

    def __init__(self, head_scale: float = 1.0):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.register_buffer("w", torch.randn(3 * 8 * 8, 16, generator=g) / 8)
        self.register_buffer("head", torch.randn(16, 10, generator=g) * head_scale)
        self.num_features = 16
        self.calls = 0

    def extract(self, images):
        self.calls += 1
        f = (images.float().flatten(1) / 255) @ self.w
        return f, f @ self.head


def _images(n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, 8, 8), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def _noisy(images: torch.Tensor, sigma: float) -> torch.Tensor:
    noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(1)) * sigma
    return (images.float() + noise).round().clamp(0, 255).to(torch.uint8)


def test_fid_self_zero_monotone_in_noise_and_one_forward_per_batch():
    ext = Projection()
    m = build_metrics(ext, kid_subset_size=100, kid_subsets=10)
    real = _images(400, 0)
    m.update(real, real=True)
    fids = []
    for sigma in (0, 10, 20, 40, 80):
        m.fid.reset(), m.kid.reset(), m.inception_score.reset()  # the reference side survives reset
        calls = ext.calls
        m.update(_noisy(real, sigma), real=False)
        assert ext.calls == calls + 1  # FID, KID and IS share one extractor forward
        fids.append(m.compute()["fid"])
    assert abs(fids[0]) < 1e-3
    assert all(a < b for a, b in zip(fids, fids[1:])), fids


def test_torchmetrics_fid_matches_float64_reference():
    ext = Projection()
    m = build_metrics(ext, kid_subset_size=50, kid_subsets=2)
    real, fake = _images(300, 0), _noisy(_images(300, 1), 30)
    m.update(real, real=True)
    m.update(fake, real=False)
    ref = frechet_distance(*gaussian_stats(ext(real)[0]), *gaussian_stats(ext(fake)[0]))
    # both accumulate in float64 (D=16 << N=300, well conditioned); torchmetrics casts its result to the
    # features' float32, so agreement is bounded by float32 rounding (~6e-8 relative): 1e-5 leaves 100x margin
    assert float(m.fid.compute()) == pytest.approx(ref, rel=1e-5)


def test_frechet_distance_closed_form():
    # diagonal covariances: FID = |mu1 - mu2|^2 + sum_i (sqrt(a_i) - sqrt(b_i))^2
    a, b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 0.25])
    mu1, mu2 = np.zeros(3), np.array([1.0, 2.0, 0.0])
    expected = 5.0 + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-12)


def test_kid_subset_clamped_with_warning():
    m = build_metrics(Projection(), kid_subset_size=1000, kid_subsets=5)
    m.update(_images(80, 0), real=True)
    m.update(_images(50, 1), real=False)
    with pytest.warns(UserWarning, match="clamped from 1000 to 50"):
        out = m.compute()
    assert out["kid_subset_size"] == 50 and math.isfinite(out["kid_mean"])


def test_inception_score_of_uniform_logits_is_one():
    m = build_metrics(Projection(head_scale=0.0), kid_subset_size=10, kid_subsets=2, is_splits=4)
    m.update(_images(20, 0), real=True)
    m.update(_images(40, 1), real=False)
    out = m.compute()
    assert out["is_mean"] == pytest.approx(1.0, abs=1e-6) and out["is_std"] == pytest.approx(0.0, abs=1e-6)


def test_scores_are_seeded():
    m = build_metrics(Projection(), kid_subset_size=30, kid_subsets=5)
    m.update(_images(60, 0), real=True)
    m.update(_images(60, 1), real=False)
    assert m.compute(seed=3) == m.compute(seed=3)


def test_score_images_on_synthetic_reference_with_cache(tmp_path, monkeypatch):
    torch.manual_seed(0)
    ext = ClassifierExtractor(SmallClassifier(8, width=8, feature_dim=16))
    same = to_uint8(make_synthetic_images(64, 16, seed=0)[0])  # exactly the reference images
    kw = dict(n_real=64, kid_subset_size=32, kid_subsets=5, cache_dir=tmp_path, progress=False)
    first = score_images(same, "synthetic", ext, **kw)
    assert abs(first["fid"]) < 1e-3 and first["n_real"] == 64 and len(list(tmp_path.glob("real_*.pt"))) == 1

    def no_images(*a, **k):
        raise AssertionError("reference images re-read despite the cache")

    monkeypatch.setattr(image_metrics, "load_real_images", no_images)
    assert score_images(same, "synthetic", ext, **kw) == first
    noisy = score_images(_noisy(same, 40), "synthetic", ext, **kw)
    assert noisy["fid"] > first["fid"] + 1e-3
    with pytest.raises(TypeError, match="uint8"):
        score_images(same.float(), "synthetic", ext, **kw)


def test_missing_inception_weights_name_the_file(tmp_path):
    for given in (None, tmp_path / "missing.pth", tmp_path):
        with pytest.raises(FileNotFoundError, match=INCEPTION_WEIGHTS_NAME):
            InceptionExtractor(given)


class _Payload:
    pass


def test_inception_extractor_end_to_end_with_random_weights(tmp_path, monkeypatch):
    """The CIFAR-10 path offline: a weights file of the right format (random values) loads, and one forward per
    batch feeds FID (2048-d pool3), KID and IS (1008 unbiased logits)."""
    import torch_fidelity.feature_extractor_inceptionv3 as tfi

    with monkeypatch.context() as m:  # build a randomly initialised network without any download
        m.setattr(tfi, "load_state_dict_from_url", lambda *a, **k: None)
        m.setattr(tfi.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd: None)
        net = tfi.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    torch.save(net.state_dict(), tmp_path / INCEPTION_WEIGHTS_NAME)
    ext = InceptionExtractor(tmp_path)
    real = _images(2, 0)
    features, logits = ext(real)
    assert features.shape == (2, 2048) and logits.shape == (2, 1008)
    scores = build_metrics(ext, kid_subset_size=2, kid_subsets=2, is_splits=2)
    extract, calls = ext.extract, []
    monkeypatch.setattr(ext, "extract", lambda x: calls.append(x) or extract(x))
    scores.update(real, real=True)  # same tensor as above: served from the memo
    scores.update(_images(2, 1), real=False)
    assert len(calls) == 1 and int(scores.fid.fake_features_num_samples) == 2
    # (FID itself is not computed: eigvals of a 2048x2048 product takes 10-30 s on this CPU)
    assert math.isfinite(float(scores.inception_score.compute()[0]))


def test_inception_weights_with_code_objects_are_refused(tmp_path):
    path = tmp_path / INCEPTION_WEIGHTS_NAME
    torch.save({"x": _Payload()}, path)
    with pytest.raises(ValueError, match="not a plain Inception state_dict"):
        InceptionExtractor(tmp_path)


def _cifar_batch(path, images: np.ndarray) -> None:
    blob = pickle.dumps({b"data": images.reshape(len(images), -1), b"labels": [0] * len(images)}, protocol=2)
    # the official batches (numpy 1.x era) name the array constructor's module numpy.core.multiarray
    path.write_bytes(blob.replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))


def test_cifar10_python_batches(tmp_path):
    rng = np.random.default_rng(0)
    batches = [rng.integers(0, 256, (10, 3, 32, 32), dtype=np.uint8) for _ in range(2)]
    for i, b in enumerate(batches, 1):
        _cifar_batch(tmp_path / f"data_batch_{i}", b)
    got = load_real_images(tmp_path, 15)
    assert got.dtype == torch.uint8 and torch.equal(got, torch.from_numpy(np.concatenate(batches)[:15]))
    with pytest.raises(ValueError, match="only 20"):
        load_real_images(tmp_path, 30)


def test_cifar10_pickle_with_code_is_refused(tmp_path):
    (tmp_path / "data_batch_1").write_bytes(pickle.dumps({b"data": print}))
    with pytest.raises(ValueError, match="data_batch_1.*refusing to load builtins.print"):
        load_real_images(tmp_path, 1)


def test_png_folder_and_uint8_rounding_match_save_image(tmp_path):
    x = torch.rand(3, 3, 8, 8) * 2 - 1
    for i in range(3):
        save_image((x[i] + 1) / 2, tmp_path / f"{i:03d}.png")
    assert torch.equal(load_real_images(tmp_path, 3), to_uint8(x))
    Image.new("RGB", (4, 4)).save(tmp_path / "zzz.png")
    with pytest.raises(ValueError, match="differ in size"):
        load_real_images(tmp_path, 4)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_real_images(tmp_path / "nowhere", 1)


def test_psnr_hand_computed():
    a = torch.zeros(2, 3, 4, 4, dtype=torch.uint8)
    b = a.clone()
    b[0] = 255  # mse 1 -> 0 dB
    b[1] = 51   # 0.2 -> mse 0.04 -> 10 log10(25) dB
    expected = (0.0 + 10 * math.log10(25)) / 2
    assert psnr(a, b) == pytest.approx(expected, rel=1e-12)
    assert psnr(a.double() / 255, b.double() / 255) == pytest.approx(expected, rel=1e-12)
    assert psnr(a, a) == math.inf
    with pytest.raises(ValueError, match="equal shapes"):
        psnr(a, b[:1])


def test_squared_error_is_float64_elementwise():
    eps, ref = torch.tensor([[1.0, 2.0], [0.5, -1.0]]), torch.tensor([[0.0, 2.0], [0.25, 1.0]])
    err = squared_error(eps, ref)
    assert err.dtype == torch.float64 and err.tolist() == [[1.0, 0.0], [0.0625, 4.0]]
    big = torch.tensor([16777217.0], dtype=torch.float64)  # 2^24 + 1: not a float32 number
    assert squared_error(big, torch.zeros(1)).item() == 16777217.0 ** 2


def test_chunk_spread_equals_separate_scores_of_each_chunk(tmp_path):
    torch.manual_seed(0)
    ext = ClassifierExtractor(SmallClassifier(8, width=8, feature_dim=16))
    fake = _noisy(to_uint8(make_synthetic_images(48, 16, seed=5)[0]), 20)
    kw = dict(n_real=64, kid_subset_size=8, kid_subsets=5, is_splits=2, cache_dir=tmp_path, progress=False)
    whole = score_images(fake, "synthetic", ext, chunks=3, **kw)
    assert whole["fid"] == score_images(fake, "synthetic", ext, **kw)["fid"]  # chunking leaves the headline alone
    assert whole["chunks"] == 3 and whole["chunk_size"] == 16
    for c in range(3):
        alone = score_images(fake[16 * c:16 * (c + 1)], "synthetic", ext, **kw)
        assert whole["fid_chunks"][c] == pytest.approx(alone["fid"], rel=1e-6)
        assert whole["kid_chunks"][c] == pytest.approx(alone["kid_mean"], rel=1e-6)
        assert whole["is_chunks"][c] == pytest.approx(alone["is_mean"], rel=1e-6)
    assert whole["fid_std"] == pytest.approx(float(np.std(whole["fid_chunks"], ddof=1)), rel=1e-9)
    with pytest.raises(ValueError, match="cannot be split into 40 chunks"):
        score_images(fake, "synthetic", ext, chunks=40, **kw)


def test_psnr_per_image_hand_computed():
    a = torch.zeros(2, 3, 2, 2, dtype=torch.uint8)
    b = a.clone()
    b[0, 0, 0, 0] = 255  # mse 1/12 -> 10 log10(12)
    b[1] = 51  # 0.2 everywhere -> mse 0.04 -> 13.9794 dB
    per = psnr_per_image(a, b)
    assert per.tolist() == pytest.approx([10 * math.log10(12), -10 * math.log10(0.04)], abs=1e-9)
    assert psnr(a, b) == pytest.approx(float(per.mean()), abs=1e-12)
