"""Packaging beyond pyproject.toml: the wheel ships the repository's ``checkpoints/`` (the embedded default's weights)
and user configs ``configs/<name>/`` inside the package, as ``mmqdiff/checkpoints/`` and ``mmqdiff/configs/<name>/``
beside the model configs, without a second copy in git; ``mmqdiff.io.shipped_path`` finds them there. Packages are
discovered, so a new subpackage or config folder ships without an edit here."""
from pathlib import Path

from setuptools import find_packages, setup

CONFIG_FOLDERS = sorted(p.name for p in (Path(__file__).parent / "configs").iterdir() if p.is_dir())
SHIPPED = {"mmqdiff.checkpoints": "checkpoints", **{f"mmqdiff.configs.{name}": f"configs/{name}"
                                                     for name in CONFIG_FOLDERS}}

setup(packages=[*find_packages(include=["mmqdiff*"]), "mmqdiff.configs", *SHIPPED],
      package_dir=SHIPPED,
      package_data={"mmqdiff.configs": ["*.yaml"], "mmqdiff.checkpoints": ["*.pt", "*.pt.sha256"],
                    **{f"mmqdiff.configs.{name}": ["*.yaml"] for name in CONFIG_FOLDERS}})
