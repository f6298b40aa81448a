"""Errors raised while LightningCLI builds the model or data reach the user as the project's own message."""
from __future__ import annotations

import subprocess
import sys

import pytest

import cli

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
