"""SmallClassifier shapes, save/load round trip, load errors, and a few real training steps that export a file."""
from __future__ import annotations

import lightning as L
import pytest
import torch

from mmqdiff.data.synthetic import NUM_CLASSES, SyntheticDataModule
from mmqdiff.evaluation.features import SmallClassifier, load_feature_extractor, save_feature_extractor
from mmqdiff.lightning.train_classifier import ClassifierTraining


@pytest.mark.parametrize("size", [16, 32])
def test_shapes_at_both_resolutions(size):
    m = SmallClassifier(5, width=8, feature_dim=24)
    x = torch.rand(3, 3, size, size) * 2 - 1
    assert m.features(x).shape == (3, 24)
    assert m(x).shape == (3, 5)


def test_round_trip(tmp_path):
    torch.manual_seed(0)
    m = SmallClassifier(4, width=8, feature_dim=16)
    path = save_feature_extractor(m, tmp_path / "sub" / "f.pt")
    assert not list(path.parent.glob(".*tmp*"))  # temporary file renamed away
    loaded = load_feature_extractor(path)
    assert loaded.config == m.config and not loaded.training
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    torch.testing.assert_close(loaded(x), m.eval()(x))


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_feature_extractor(tmp_path / "nope.pt")
    bad = tmp_path / "bad.pt"
    torch.save({"weights": {}}, bad)
    with pytest.raises(ValueError, match=r"bad\.pt.*'config' and 'state_dict'"):
        load_feature_extractor(bad)
    m = SmallClassifier(4, width=8, feature_dim=16)
    torch.save({"config": {**m.config, "feature_dim": 32}, "state_dict": m.state_dict()}, bad)
    with pytest.raises(ValueError, match=r"bad\.pt.*does not match"):
        load_feature_extractor(bad)
    bad.write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match=r"bad\.pt.*cannot be read"):
        load_feature_extractor(bad)


def test_training_steps_export_a_loadable_file(tmp_path):
    export = tmp_path / "features.pt"
    model = ClassifierTraining(width=8, feature_dim=16, export_path=str(export))
    data = SyntheticDataModule(num_train=48, num_val=16, batch_size=16)
    trainer = L.Trainer(max_steps=3, limit_val_batches=1, accelerator="cpu", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=tmp_path)
    trainer.fit(model, data)
    loaded = load_feature_extractor(export)
    assert loaded.config == dict(num_classes=NUM_CLASSES, in_channels=3, width=8, feature_dim=16)
    assert "val/acc" in trainer.callback_metrics
