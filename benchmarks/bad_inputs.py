"""What each bad input of issue 11 gets now: runs every case through ``cli.main`` or the public API on the embedded
model (10 quad steps, tiny calibration) in a temporary folder and prints a markdown table (paths shortened to <tmp>).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bad_inputs.py
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import cli  # noqa: E402
from mmqdiff import pipeline  # noqa: E402
from mmqdiff.data import record_trajectories, save_calibration  # noqa: E402
from mmqdiff.diffusion import build_model, linear_betas, load_checkpoint, timesteps  # noqa: E402
from mmqdiff.io import RunLock  # noqa: E402
from mmqdiff.lightning.calib_data import CalibrationDataModule  # noqa: E402
from mmqdiff.segments.run_folder import load_segment_models  # noqa: E402
from mmqdiff.quant import QuantConfig, export_packed, packed_nbytes, quantize_model  # noqa: E402

STEPS = 10
MODEL, CKPT = ROOT / "configs/embedded.yaml", ROOT / "checkpoints/embedded_unet.pt"


class Payload:
    """Pickles to a call of print: a stand-in for code hidden in a checkpoint (weights-only loading must refuse it)."""

    def __reduce__(self):
        return print, ("payload ran",)


class LogTail(logging.Handler):
    """The warnings a case logged (the project logs what it repairs or takes over)."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record.getMessage())


def main() -> None:
    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp(prefix="bad_inputs_"))
    logs = LogTail()
    logging.getLogger("mmqdiff").addHandler(logs)
    short = lambda text: text.replace(str(tmp), "<tmp>").replace(str(ROOT) + "/", "")  # noqa: E731
    rows: list[tuple[str, str]] = []

    def case(name: str, run: Callable[[], str]) -> None:
        logs.records.clear()
        try:
            result = "accepted: " + run()
        except Exception as e:  # noqa: BLE001 -- the outcome is what we record
            result = f"refused: `{type(e).__name__}: {' '.join(str(e).split())}`"
        if logs.records:
            result += f"; logged: `{' '.join(logs.records[0].split())}`"
        rows.append((name, short(result)))
        print(f"{name}\n    {short(result)}", flush=True)

    # ------------------------------------------------------------------------------------------------- a small world
    fp = load_checkpoint(build_model(MODEL), CKPT).eval()
    with torch.no_grad():
        xs, ts = record_trajectories(fp, range(8), 0, timesteps(STEPS, "quad"), linear_betas(), 0.0, (3, 16, 16))
    calib = save_calibration(tmp / "calib.pt", xs, ts, {"num_steps": STEPS, "skip_type": "quad"})
    fit_args = lambda run_dir, *extra: ["fit", "--config", str(ROOT / "configs/embedded/calibrate_k4.yaml"),  # noqa
                                        "--trainer.default_root_dir", str(run_dir), "--trainer.devices", "1",
                                        "--trainer.strategy", "auto", "--data.init_args.path", str(calib),
                                        "--data.init_args.num_steps", str(STEPS), "--data.init_args.k", "2",
                                        "--data.init_args.cali_st", "2", "--data.init_args.cali_n", "6",
                                        "--model.init_args.recon.cali_iters", "4",
                                        "--model.init_args.recon.cali_iters_a", "3", *extra]
    cli.main(fit_args(tmp / "calib_k2"))
    sample_args = lambda out, *extra: ["predict", "--config", str(ROOT / "configs/embedded/sample.yaml"),  # noqa
                                       "--model.init_args.num_steps", str(STEPS), "--model.init_args.real_source",
                                       "null", "--model.init_args.fp_error_images", "0",
                                       "--data.init_args.num_images", "2", "--data.init_args.batch_size", "2",
                                       "--data.init_args.output_dir", str(out), "--trainer.default_root_dir",
                                       str(out), *extra]
    cli.main(sample_args(tmp / "samples_fp"))

    # ------------------------------------------------------------------------------------------------------ cases
    def sample(out: Path, *extra: str) -> str:
        cli.main(sample_args(out, *extra))
        return f"{len(list((out / 'images').glob('*.png')))} images in the folder"

    case("1. sample the K=2 run into the FP run's image folder",
         lambda: sample(tmp / "samples_fp", "--model.init_args.calibration_run", str(tmp / "calib_k2")))
    case("1. resume FP sampling with another seed",
         lambda: sample(tmp / "samples_fp", "--model.init_args.seed", "5"))
    case("1. the same, with --data.init_args.overwrite true",
         lambda: sample(tmp / "samples_fp", "--model.init_args.seed", "5", "--data.init_args.overwrite", "true"))

    case("1. PSNR reference: K=2 sampling against an FP folder sampled with seed 5 (this run: 1234)",
         lambda: sample(tmp / "samples_k2", "--model.init_args.calibration_run", str(tmp / "calib_k2"),
                        "--model.init_args.fp_samples", str(tmp / "samples_fp")))

    def datamodule(path: Path) -> str:
        dm = CalibrationDataModule(str(path), STEPS, k=2, segment=[0, 1], cali_st=2, cali_n=6, skip_type="quad")
        dm.setup()
        dm.select()
        return f"segment t ranges {[r['t_range'] for r in dm.summary]}"

    flipped = save_calibration(tmp / "ascending.pt", torch.cat([xs[:STEPS].flip(0), xs[STEPS:]]), ts.flip(0))
    case("2. calibration file with ts in ascending order (CalibrationDataModule)", lambda: datamodule(flipped))
    zeros = save_calibration(tmp / "zeros.pt", xs, torch.zeros_like(ts))
    case("2. calibration file with all-zero ts (fit)",
         lambda: cli.main(fit_args(tmp / "z", "--data.init_args.path", str(zeros))) and "")

    sd = {k: v.clone() for k, v in fp.state_dict().items()}
    sd["mid.attn_1.q.weight"].view(-1)[7] = float("nan")
    torch.save(sd, tmp / "nan.pt")
    case("3. FP checkpoint with one NaN weight (FP sampling)",
         lambda: sample(tmp / "s_nan", "--model.init_args.checkpoint", str(tmp / "nan.pt")))
    sd = {k: v.clone() for k, v in fp.state_dict().items()}
    sd["conv_out.weight"] *= 1e36
    torch.save(sd, tmp / "huge.pt")
    gen_args = lambda path, *extra: ["predict", "--config", str(ROOT / "configs/embedded/gen_calib.yaml"),  # noqa
                                     "--model.init_args.num_steps", str(STEPS), "--data.init_args.num_trajectories",
                                     "4", "--trainer.default_root_dir", str(tmp),
                                     "--trainer.callbacks.init_args.path", str(path), *extra]
    case("3. FP weights finite but diverging (calibration-data generation)",
         lambda: cli.main(gen_args(tmp / "gen_huge.pt", "--model.init_args.checkpoint", str(tmp / "huge.pt")))
         and f"file written: {(tmp / 'gen_huge.pt').exists()}")

    def while_locked(path: Path, run: Callable[[], str]) -> str:
        with RunLock(path, "held by this benchmark"):
            return run()

    case("4. second `fit` on a run folder another live run holds",
         lambda: while_locked(tmp / "calib_k2/mmqdiff.lock",
                              lambda: cli.main(fit_args(tmp / "calib_k2", "--ckpt_path", "last")) and ""))
    case("4. sampling into a folder another live run holds",
         lambda: while_locked(tmp / "samples_fp/mmqdiff.lock", lambda: sample(tmp / "samples_fp")))
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp / "samples_fp/mmqdiff.lock").write_text(json.dumps({"pid": int(dead.stdout), "host": os.uname().nodename,
                                                             "started": "earlier", "command": "cli.py predict"}))
    case("4. lock file left by a killed run (sampling)",
         lambda: sample(tmp / "samples_fp", "--model.init_args.seed", "5"))

    (tmp / "file").write_text("not a folder")
    case("5. calibration-data generation into a folder that is a file",
         lambda: cli.main(gen_args(tmp / "file/calib.pt")) and "")

    k2 = tmp / "calib_k2"
    (k2 / "segment_01/packed.pt").unlink()
    case("6. `segment_01/packed.pt` deleted, pipeline calibration stage rerun",
         lambda: pipeline.calibrate({"name": "K=2", "run_dir": str(k2), "config": "unused"}, str(calib), {}) or
         f"segment 1 re-exported from checkpoints/last.ckpt; load_segment_models works: "
         f"{len(load_segment_models(k2)[1])} models")
    case("6. a pipeline stage whose process fails (missing checkpoint)",
         lambda: pipeline._stage("sample FP", sample_args(tmp / "s_fail", "--model.init_args.checkpoint",
                                                          str(tmp / "nope.pt")), {}) or "")

    shutil.copytree(tmp / "samples_fp", tmp / "samples_damaged")
    (tmp / "samples_damaged/images/000000.png").write_bytes(b"")
    png = tmp / "samples_damaged/images/000001.png"
    png.write_bytes(png.read_bytes()[:40])
    case("7. resumed sampling over a zero-byte and a truncated PNG", lambda: sample(tmp / "samples_damaged",
                                                                                   "--model.init_args.seed", "5"))

    case("8. `predict` with a checkpoint that does not exist (in-process `cli.main`)",
         lambda: sample(tmp / "s_missing", "--model.init_args.checkpoint", str(tmp / "nope.pt")))
    case("8. `fit` with quant.weight_bits 99", lambda: cli.main(fit_args(tmp / "w99", "--model.init_args.quant."
                                                                          "weight_bits", "99")) and "")

    broken = tmp / "calib_k2_broken"
    shutil.copytree(k2, broken)
    (broken / "segment_00/packed.pt").write_bytes(b"PK\x03\x04 junk")
    manifest = json.loads((broken / "manifest.json").read_text())
    from mmqdiff.diffusion import file_sha256
    manifest["segments"][0]["sha256"]["packed"] = file_sha256(broken / "segment_00/packed.pt")
    (broken / "manifest.json").write_text(json.dumps(manifest))
    case("9. `packed.pt` replaced by junk, manifest hash updated to match", lambda: str(load_segment_models(broken)))
    last = k2 / "checkpoints/last.ckpt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    case("9. truncated `checkpoints/last.ckpt`, `--ckpt_path last`",
         lambda: cli.main(fit_args(k2, "--ckpt_path", "last")) and "")
    torch.save({"x": Payload()}, last)
    case("9. `checkpoints/last.ckpt` replaced by a pickle payload, `--ckpt_path last`",
         lambda: cli.main(fit_args(k2, "--ckpt_path", "last")) and "")
    case("9. missing calibration file", lambda: cli.main(fit_args(tmp / "m", "--data.init_args.path",
                                                                  str(tmp / "nope.pt"))) and "")
    case("10. `recon.lr_w 0`", lambda: cli.main(fit_args(tmp / "lr", "--model.init_args.recon.lr_w", "0")) and "")
    case("10. `recon.cache_device gpu`",
         lambda: cli.main(fit_args(tmp / "cd", "--model.init_args.recon.cache_device", "gpu")) and "")

    torch.save({"state_dict": {f"model.{k}": v for k, v in fp.state_dict().items()}}, tmp / "resaved.ckpt")
    (tmp / "samples_fp/images/000001.png").unlink()
    case("11. resume sampling with the same weights re-saved as a Lightning checkpoint",
         lambda: sample(tmp / "samples_fp", "--model.init_args.seed", "5", "--model.init_args.checkpoint",
                        str(tmp / "resaved.ckpt")))

    def w16() -> str:
        export = export_packed(quantize_model(build_model(MODEL), QuantConfig(weight_bits=16, act_bits=16)))
        codes = [v for k, v in export.items() if k.endswith(".codes")]
        n = sum(c.numel() for c in codes)
        return (f"codes {codes[0].dtype}, packed_nbytes {packed_nbytes(export):,} for {n:,} weights "
                f"(int32 codes: {packed_nbytes(export) + 2 * n:,})")

    case("12. W16 packed export of the embedded model", w16)

    print("\n| bad input (issue 11 item) | what it gets now |\n|---|---|")
    for name, result in rows:
        print(f"| {name} | {result.replace('|', '/')} |")
    shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
