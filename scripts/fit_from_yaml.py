"""Run a fit config without LightningCLI (for machines lacking jsonargparse, e.g. a bare GPU image).

Same objects, same settings as ``python cli.py fit --config CONFIG``; ``--set key=value`` overrides
dotted keys (``model.init_args.export_path=...``).
"""
from __future__ import annotations

import argparse
import importlib

import lightning as L
import yaml


def _build(spec: dict):
    module, _, name = spec["class_path"].rpartition(".")
    return getattr(importlib.import_module(module), name)(**spec.get("init_args", {}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("config")
    ap.add_argument("--set", action="append", default=[])
    args = ap.parse_args()
    cfg = yaml.safe_load(open(args.config))
    for item in args.set:
        key, _, value = item.partition("=")
        *parents, leaf = key.split(".")
        node = cfg
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = yaml.safe_load(value)
    L.seed_everything(cfg.get("seed_everything", 0))
    trainer = L.Trainer(**cfg.get("trainer", {}))
    trainer.fit(_build(cfg["model"]), datamodule=_build(cfg["data"]) if "data" in cfg else None)


if __name__ == "__main__":
    main()
