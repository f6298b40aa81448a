"""The main job end to end on a shrunken embedded default (few steps, images and iterations)."""
from __future__ import annotations

import json
import sys

import pytest
import yaml

from mmqdiff import pipeline
from mmqdiff.evaluation.heldout import damage_boundaries
from mmqdiff.evaluation.report import REQUIRED_KEYS

from .conftest import ROOT

STEPS = ["--model.init_args.num_steps", "6"]
CALIB = ["--data.init_args.num_steps", "6", "--data.init_args.cali_st", "2", "--data.init_args.cali_n", "4",
         "--model.init_args.recon.cali_iters", "2", "--model.init_args.recon.cali_iters_a", "2",
         "--trainer.devices", "1", "--trainer.strategy", "auto"]


@pytest.mark.slow
def test_main_job_writes_report_with_fp_k1_k2(tmp_path, capsys):
    out = tmp_path / "out"
    cfg = {
        "output_dir": str(out),
        "calibration_data": {"config": str(ROOT / "configs/embedded/gen_calib.yaml"), "path": str(out / "calib.pt"),
                             "args": [*STEPS, "--data.init_args.num_trajectories", "8"]},
        "calibrations": [
            {"name": "W4A8 K=1", "config": str(ROOT / "configs/embedded/calibrate_k1.yaml"),
             "run_dir": str(out / "calib_k1"), "args": CALIB},
            {"name": "W4A8 K=2", "config": str(ROOT / "configs/embedded/calibrate_k4.yaml"),
             "run_dir": str(out / "calib_k2"), "args": [*CALIB, "--data.init_args.k", "2"],
             "boundaries_from": "W4A8 K=1"},
            {"name": "W4A8 K=1, K=2's compute", "config": str(ROOT / "configs/embedded/calibrate_k1.yaml"),
             "run_dir": str(out / "calib_k1_eq"), "equal_compute_to": "W4A8 K=2",
             "args": [*CALIB, "--model.init_args.recon.cali_iters", "4", "--model.init_args.recon.cali_iters_a", "4"]},
        ],
        "heldout_trajectories": [4, 8],
        "sampling": {"config": str(ROOT / "configs/embedded/sample.yaml"), "model_config": "configs/embedded.yaml",
                     "num_images": 6, "args": [*STEPS, "--model.init_args.num_real", "64",
                                               "--model.init_args.kid_subset_size", "3",
                                               "--model.init_args.score_chunks", "2",
                                               "--data.init_args.batch_size", "3"]},
    }
    (tmp_path / "main.yaml").write_text(yaml.safe_dump(cfg))
    report = pipeline.main(["--config", str(tmp_path / "main.yaml")])
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(report.resolve())
    runs = json.loads(report.read_text())["runs"]
    assert [r["name"] for r in runs] == ["FP", "W4A8 K=1", "W4A8 K=2", "W4A8 K=1, K=2's compute"]
    for run in runs:
        assert set(REQUIRED_KEYS) <= set(run)
        assert len(run["fid_chunks"]) == 2 and run["fid_std"] >= 0
    fp, k1, k2, k1_eq = runs
    assert k1_eq["calib_iters_total"] == k2["calib_iters_total"] == [4, 4] and k1["calib_iters_total"] == [2, 2]
    assert all(r["heldout_x_mse"] > 0 and len(r["heldout_per_step"]) == 6 for r in (k1, k2, k1_eq))
    assert len(k1["psnr_chunks"]) == 2
    assert fp["segments"] is None and fp["psnr_vs_fp"] is None
    assert (k1["segments"], k2["segments"]) == (1, 2) and k1["weight_bits"] == 4 and k1["act_bits"] == 8
    assert k2["model_bytes"] == 2 * k1["model_bytes"] < fp["model_bytes"]
    cut = damage_boundaries(out / "calib_k1", out / "calib.pt", 2)  # from data, on K=1's calibration trajectories
    assert k2["segment_steps"] == [[0, cut[0]], [cut[0], 6]]
    assert all(r["fid"] is not None and r["psnr_vs_fp"] > 0 for r in (k1, k2))
    assert len(k1["per_step_mse"]) == 6 and (out / "report/per_step_mse.png").is_file()
    assert yaml.safe_load((out / "report/pipeline_config.yaml").read_text()) == cfg  # the config beside its report
    # a rerun finds every artefact and only rewrites the report
    before = (out / "samples_calib_k2/metrics.json").stat().st_mtime_ns
    pipeline.main(["--config", str(tmp_path / "main.yaml")])
    assert (out / "samples_calib_k2/metrics.json").stat().st_mtime_ns == before


def test_equal_compute_pairs_are_checked(monkeypatch):
    manifests = {"a": {"reconstruction": {"cali_iters": 8, "cali_iters_a": 2}, "segments": [{}] * 4},
                 "b": {"reconstruction": {"cali_iters": 32, "cali_iters_a": 8}, "segments": [{}]},
                 "c": {"reconstruction": {"cali_iters": 32, "cali_iters_a": 4}, "segments": [{}]}}
    monkeypatch.setattr(pipeline, "read_manifest", lambda run_dir: manifests[run_dir])
    runs = [{"name": "K=4", "run_dir": "a"}, {"name": "K=1 eq", "run_dir": "b", "equal_compute_to": "K=4"}]
    pipeline.check_equal_compute(runs)
    runs[1]["run_dir"] = "c"
    with pytest.raises(ValueError, match=r"K=1 eq spent \[32, 4\] .* K=4 \[32, 8\]"):
        pipeline.check_equal_compute(runs)
    # a warm-started run counts its base run's iterations: 8/2 from K=1 + 4 segments x 6/2 = 32/10
    manifests["w"] = {"reconstruction": {"cali_iters": 6, "cali_iters_a": 2}, "segments": [{}] * 4,
                      "init_from": {"compute": [8, 2]}}
    manifests["d"] = {"reconstruction": {"cali_iters": 32, "cali_iters_a": 10}, "segments": [{}]}
    pipeline.check_equal_compute([{"name": "warm K=4", "run_dir": "w"},
                                  {"name": "K=1 eq", "run_dir": "d", "equal_compute_to": "warm K=4"}])
    runs[1]["equal_compute_to"] = "K=8"
    with pytest.raises(ValueError, match="'K=8', which is not among"):
        pipeline.check_equal_compute(runs)


def test_boundaries_from_an_earlier_run(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(pipeline, "damage_boundaries", lambda run_dir, data, k: calls.append((run_dir, data, k)) or
                        [3, 9, 20][:k - 1])
    k4 = {"name": "K=4", "config": str(ROOT / "configs/embedded/calibrate_k4.yaml"), "boundaries_from": "K=1"}
    runs = [{"name": "K=1", "run_dir": "r1"}, k4]
    assert pipeline.data_driven_boundaries(k4, runs, "c.pt") == ["--data.init_args.boundaries", "[3, 9, 20]"]
    assert calls == [("r1", "c.pt", 4)]  # k from the entry's config
    k4["args"] = ["--data.init_args.k", "2"]
    assert pipeline.data_driven_boundaries(k4, runs, "c.pt") == ["--data.init_args.boundaries", "[3]"]
    assert pipeline.data_driven_boundaries(runs[0], runs, "c.pt") == []  # no boundaries_from: the config's cuts
    with pytest.raises(ValueError, match="boundaries_from names 'K=1', which is not a calibration listed before"):
        pipeline.data_driven_boundaries(k4, [k4, runs[0]], "c.pt")


def test_failed_stage_ends_with_the_childs_own_error(tmp_path, monkeypatch, capsys):
    child = tmp_path / "cli.py"
    child.write_text("import sys\n"
                     "print('progress line', flush=True)\n"
                     "sys.stderr.write('a warning\\n')\n"
                     "try:\n    open('/nonexistent/x')\nexcept OSError as e:\n"
                     "    raise ValueError('outputs/calib_k4/segment_01/packed.pt is missing\\nrerun with [brackets]') "
                     "from e\n")
    monkeypatch.setattr(pipeline, "CLI_COMMAND", [sys.executable, str(child)])
    timings = {}
    with pytest.raises(RuntimeError) as failure:
        pipeline._stage("sample K=4", ["predict"], timings)
    assert str(failure.value) == ("stage 'sample K=4' failed (exit code 1):\n"
                                  "ValueError: outputs/calib_k4/segment_01/packed.pt is missing\n"
                                  "rerun with [brackets]")
    assert timings == {} and "a warning" in capsys.readouterr().err  # stderr still shown as it came


def test_child_error_without_traceback_is_its_last_lines():
    assert pipeline.child_error(["noise\n", "usage: cli.py ...\n", "error: unrecognized arguments: --x\n", "\n"]) == \
        "noise\nusage: cli.py ...\nerror: unrecognized arguments: --x"


def test_cpu_sampling_processes(monkeypatch):
    """sampling.cpu_processes: DDP flags on a CPU-only machine, none with a GPU or for one process; bad values named."""
    monkeypatch.setattr(pipeline.torch.cuda, "is_available", lambda: False)
    assert pipeline.cpu_parallel_args(1) == []
    assert pipeline.cpu_parallel_args(2) == ["--trainer.accelerator", "cpu", "--trainer.devices", "2",
                                             "--trainer.strategy", "ddp"]
    for bad in (0, "2", 1.5):
        with pytest.raises(ValueError, match=r"sampling.cpu_processes must be an integer >= 1, got"):
            pipeline.cpu_parallel_args(bad)
    monkeypatch.setattr(pipeline.torch.cuda, "is_available", lambda: True)
    assert pipeline.cpu_parallel_args(2) == []
