"""The package works installed and from any folder: the shipped checkpoints and configs resolve by their repository
paths (``mmqdiff.io.shipped_path``), pyproject.toml ships every package and data folder, and (slow) a non-editable
``pip install`` into a fresh venv runs the README's Python API example and the ``mmqdiff`` command outside the repo."""
from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from setuptools import find_packages

from mmqdiff.diffusion import build_model, file_sha256, load_checkpoint
from mmqdiff.evaluation.features import embedded_extractor, load_feature_extractor
from mmqdiff.io import shipped_path

from .conftest import ROOT
from .test_readme import python_blocks

UNET, FEATURES = "checkpoints/embedded_unet.pt", "checkpoints/embedded_features.pt"


def source_copy(dest: Path) -> Path:
    """The working tree's files that git tracks or would track, copied to ``dest`` (a build writes into its tree)."""
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, files):
        if (ROOT / name).is_file():  # a deleted file stays listed until its deletion is committed
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dest / name)
    return dest


def test_wheel_ships_every_package_the_shipped_files_and_the_command(tmp_path):
    source = source_copy(tmp_path / "source")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp_path), str(source)], check=True, capture_output=True)
    with zipfile.ZipFile(next(tmp_path.glob("mmqdiff-*.whl"))) as wheel:
        names = set(wheel.namelist())
        metadata = wheel.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
        scripts = wheel.read(next(n for n in names if n.endswith(".dist-info/entry_points.txt"))).decode()
    packages = {p.replace(".", "/") for p in find_packages(str(source), include=["mmqdiff*"])}
    assert packages and all(f"{p}/__init__.py" in names for p in packages)
    shipped = {f"mmqdiff/{p.relative_to(source)}" for pattern in ["checkpoints/*", "configs/*/*.yaml"]
               for p in source.glob(pattern)}
    model_configs = {f"mmqdiff/configs/{p.name}" for p in (source / "mmqdiff/configs").glob("*.yaml")}
    assert {"mmqdiff/checkpoints/embedded_unet.pt", "mmqdiff/configs/embedded/sample.yaml"} <= shipped
    assert shipped | model_configs <= names
    assert "License-Expression: MIT" in metadata.splitlines()
    assert "mmqdiff = mmqdiff.cli:run" in scripts.splitlines()


def test_shipped_paths_resolve_from_any_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name, source in [(UNET, ROOT / UNET), ("checkpoints/embedded_unet.pt.sha256", ROOT / f"{UNET}.sha256"),
                         ("configs/embedded/sample.yaml", ROOT / "configs/embedded/sample.yaml"),
                         ("configs/embedded.yaml", ROOT / "mmqdiff/configs/embedded.yaml")]:
        assert shipped_path(name).read_bytes() == source.read_bytes(), name
    for unchanged in ["checkpoints/nope.pt", "elsewhere/embedded_unet.pt", "embedded_unet.pt", str(tmp_path / UNET)]:
        assert shipped_path(unchanged) == Path(unchanged)
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / UNET).write_bytes(b"mine")
    assert shipped_path(UNET) == Path(UNET)  # the user's own file wins


def test_loaders_find_the_shipped_files_outside_the_repo(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model = load_checkpoint(build_model("configs/embedded.yaml"), UNET)
    reference = torch.load(ROOT / UNET, weights_only=True)
    assert all(torch.equal(v, reference[k]) for k, v in model.state_dict().items())
    assert file_sha256(UNET) == (ROOT / f"{UNET}.sha256").read_text().split()[0]
    features = load_feature_extractor(FEATURES)
    assert features.config == embedded_extractor().model.config
    reference = torch.load(ROOT / FEATURES, weights_only=True)["state_dict"]
    assert all(torch.equal(v, reference[k]) for k, v in features.state_dict().items())
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / UNET).write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=f"^{UNET}: cannot be read as a weights-only torch checkpoint"):
        load_checkpoint(build_model("configs/embedded.yaml"), UNET)


def section(text: str, title: str) -> str:
    """The text under the ``## title`` heading, up to the next heading of that level."""
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end >= 0 else len(text)]


def test_section():
    text = "# t\n## A\na\n### A.1\nb\n## B\nc\n"
    assert section(text, "A") == "\n## A\na\n### A.1\nb" and section(text, "B") == "\n## B\nc\n"


# --- slow: a fresh venv -------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """A venv with the project installed non-editable (``pip install --no-deps``) from a copy of the working tree;
    the dependencies come from this interpreter's site-packages (a path in a .pth file: the venv sees torch and
    friends without downloading them, and no editable mmqdiff, whose finder only a site folder's .pth would load)."""
    base = tmp_path_factory.mktemp("install")
    source = source_copy(base / "source")
    venv = base / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    venv_site = Path(subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                    capture_output=True, text=True, check=True).stdout.strip())
    (venv_site / "dependencies.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    env = {**{k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, "OMP_NUM_THREADS": "1"}  # as conftest
    subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", str(source)],
                   cwd=base, env=env, check=True)
    work = base / "work"  # outside the repository and the copy
    work.mkdir()
    return {"python": python, "bin": venv / "bin", "site": venv_site, "work": work, "env": env}


@pytest.mark.slow
def test_install_is_not_editable_and_ships_the_data(installed):
    run = subprocess.run([installed["python"], "-c", "import mmqdiff; print(mmqdiff.__file__)"], cwd=installed["work"],
                         env=installed["env"], capture_output=True, text=True, check=True)
    assert Path(run.stdout.strip()).is_relative_to(installed["site"])
    shown = subprocess.run([installed["python"], "-m", "pip", "show", "-f", "mmqdiff"], env=installed["env"],
                           capture_output=True, text=True, check=True).stdout.split()
    for name in ["mmqdiff/checkpoints/embedded_unet.pt", "mmqdiff/checkpoints/embedded_unet.pt.sha256",
                 "mmqdiff/checkpoints/embedded_features.pt", "mmqdiff/checkpoints/embedded_features.pt.sha256",
                 "mmqdiff/configs/embedded.yaml", "mmqdiff/configs/embedded/calibrate_k1.yaml",
                 "mmqdiff/configs/embedded/sample.yaml", "mmqdiff/configs/cifar10/main.yaml"]:
        assert name in shown, name
    usage = subprocess.run([installed["bin"] / "mmqdiff", "pipeline", "--help"], cwd=installed["work"],
                           env=installed["env"], capture_output=True, text=True, check=True).stdout
    assert usage.startswith("usage: mmqdiff pipeline [-h] [--config CONFIG]")


@pytest.mark.slow
def test_readme_python_api_runs_outside_the_repo(installed):
    blocks = python_blocks(section((ROOT / "README.md").read_text(), "Python API"))
    code = "\n".join(code for _, code, reason in blocks if reason is None)
    assert "load_checkpoint" in code
    script = installed["work"] / "readme_python_api.py"
    script.write_text(code)
    run = subprocess.run([installed["python"], script.name], cwd=installed["work"], env=installed["env"],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]


@pytest.mark.slow
def test_cli_samples_the_embedded_default_outside_the_repo(installed):
    out = installed["work"] / "outputs/samples"
    run = subprocess.run([installed["bin"] / "mmqdiff", "predict", "--config", "configs/embedded/sample.yaml",
                          "--trainer.accelerator", "cpu", "--data.init_args.num_images", "6",
                          "--data.init_args.batch_size", "6", "--model.init_args.num_steps", "4",
                          "--model.init_args.num_real", "24", "--model.init_args.kid_subset_size", "6",
                          "--model.init_args.score_chunks", "1", "--model.init_args.fp_error_images", "2",
                          "--data.init_args.output_dir", str(out), "--trainer.default_root_dir", str(out)],
                         cwd=installed["work"], env=installed["env"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["num_images"] == 6 and metrics["fid"] > 0
    assert len(list((out / "images").glob("*.png"))) == 6
    assert "GPU available" not in run.stderr and "GPU available" in (out / "mmqdiff.log").read_text()
