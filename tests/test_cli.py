"""The command line: errors raised while LightningCLI builds the model or data reach the user as the project's own
message; shipped configs found from any folder; the pipeline subcommand; Lightning's chatter in the run's log."""
from __future__ import annotations

import io
import logging
import os
import subprocess
import sys
import warnings

import pytest

import cli
from mmqdiff.cli import shipped_configs
from mmqdiff.io import shipped_path
from mmqdiff.lightning import LOG_NAME, run_log

from .conftest import ROOT

SAMPLE = ["predict", "--config", str(ROOT / "configs/embedded/sample.yaml"), "--trainer.accelerator", "cpu"]
CALIBRATE = ["fit", "--config", str(ROOT / "configs/embedded/calibrate_k1.yaml"), "--trainer.accelerator", "cpu",
             "--trainer.devices", "1", "--trainer.strategy", "auto"]


@pytest.mark.parametrize("args, error, message", [
    ([*SAMPLE, "--model.init_args.checkpoint", "nope.pt"], FileNotFoundError, r"checkpoint not found: nope.pt\."),
    ([*SAMPLE, "--model.init_args.calibration_run", "{tmp}/unfinished"], FileNotFoundError,
     r"no calibration manifest at .*unfinished/manifest.json \(an unfinished run has none"),
    ([*CALIBRATE, "--model.init_args.quant.weight_bits", "99"], ValueError,
     r"QuantConfig.weight_bits must be in \[2, 16\], got 99$"),
    ([*CALIBRATE, "--model.init_args.recon.lr_w", "0"], ValueError, r"ReconSettings.lr_w \(a learning rate\) must be"),
])
def test_model_build_errors_surface_as_themselves(tmp_path, args, error, message):
    (tmp_path / "unfinished" / "checkpoints").mkdir(parents=True)  # a calibration run without its manifest
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    with pytest.raises(error, match=f"^{message}"):
        cli.main([*args, "--trainer.default_root_dir", str(tmp_path / "run")])


def test_the_message_is_the_last_line_printed_once(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "cli.py"), *SAMPLE, "--model.init_args.checkpoint",
                             str(tmp_path / "nope.pt"), "--trainer.default_root_dir", str(tmp_path)],
                            cwd=ROOT, capture_output=True, text=True)
    message = f"FileNotFoundError: checkpoint not found: {tmp_path / 'nope.pt'}."
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith(message)
    assert result.stderr.count(message) == 1
    assert "Namespace(" not in result.stderr and "Union" not in result.stderr


def test_config_paths_resolve_to_the_shipped_configs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    resolved = shipped_configs(["fit", "--config", "configs/embedded/calibrate_k1.yaml",
                                "--config=configs/cifar10/sample.yaml", "--data.init_args.path", "configs/x.pt",
                                "--config", "configs/mine.yaml"])
    shipped = [shipped_path(f"configs/{name}.yaml") for name in ("embedded/calibrate_k1", "cifar10/sample")]
    assert resolved == ["fit", "--config", str(shipped[0]), f"--config={shipped[1]}", "--data.init_args.path",
                        "configs/x.pt", "--config", "configs/mine.yaml"]  # not a --config; no shipped file of the name
    assert shipped[0].is_absolute()
    assert shipped[0].read_bytes() == (ROOT / "configs/embedded/calibrate_k1.yaml").read_bytes()


def test_pipeline_subcommand_is_the_main_job(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "cli.py"), "pipeline", "--help"], cwd=tmp_path,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: mmqdiff pipeline [-h] [--config CONFIG]")


BANNERS = ("GPU available: False", "TPU available: False", "`isinstance(treespec, LeafSpec)` is deprecated")


def test_lightning_chatter_goes_to_the_run_log(tmp_path):
    """A predict run from outside the repository (shipped config, model and metric classifier): the terminal shows
    the progress bar and nothing of Lightning's set-up; the run folder's log has it."""
    out = tmp_path / "samples"
    result = subprocess.run([sys.executable, "-m", "mmqdiff.cli", "predict", "--config", "configs/embedded/sample.yaml",
                             "--trainer.accelerator", "cpu", "--model.init_args.num_steps", "2",
                             "--model.init_args.real_source", "null", "--data.init_args.num_images", "2",
                             "--data.init_args.output_dir", str(out), "--trainer.default_root_dir", str(out)],
                            cwd=tmp_path, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Predicting" in result.stdout and len(list((out / "images").glob("*.png"))) == 2
    log = (out / LOG_NAME).read_text()
    for banner in BANNERS:
        assert banner in log and banner not in result.stderr and banner not in result.stdout, banner


def test_run_log_keeps_warnings_errors_and_the_projects_own_deprecations_on_the_terminal(tmp_path):
    terminal, logger = io.StringIO(), logging.getLogger("lightning.pytorch")
    handler = logging.StreamHandler(terminal)  # what Lightning installs when nothing configured logging
    logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as shown, run_log() as log:
            warnings.simplefilter("always")
            logging.getLogger("lightning.pytorch.accelerators").info("GPU available: False")
            warnings.warn_explicit("old API", FutureWarning, "/site-packages/lib.py", 1)
            log.open(tmp_path)
            logging.getLogger("lightning.pytorch.trainer").warning("no validation loop")
            warnings.warn_explicit("our old API", DeprecationWarning, str(ROOT / "mmqdiff/io.py"), 1)
            warnings.warn_explicit("check this", UserWarning, "/site-packages/lib.py", 2)
        assert log not in logger.handlers and not handler.filters
    finally:
        logger.removeHandler(handler)
    assert terminal.getvalue() == "no validation loop\n"
    assert [str(w.message) for w in shown] == ["our old API", "check this"]
    lines = (tmp_path / LOG_NAME).read_text().splitlines()
    assert [line.split(": ", 1)[1] for line in lines] == [
        "GPU available: False", "/site-packages/lib.py:1: FutureWarning: old API", "no validation loop"]
    assert lines[0].split()[2:4] == ["INFO", "lightning.pytorch.accelerators:"]
