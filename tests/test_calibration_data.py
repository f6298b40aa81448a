import logging
from pathlib import Path

import pytest
import torch
import yaml

import cli
from mmqdiff.data import (load_calibration, read_calibration_meta, record_trajectories, save_calibration,
                          select_steps, timestep_segments, trajectory_generator)
from mmqdiff.data.calibration import calibration_sha256
from mmqdiff.diffusion import build_model, ddim_sample, file_sha256, linear_betas, state_dict_sha256, timesteps
from mmqdiff.lightning.calib_data import CalibrationDataModule
from mmqdiff.lightning.generate import CalibrationGenerator, CalibrationWriter, TrajectoryDataModule

from .conftest import foreign_lock

IMG = (3, 2, 2)
ROOT = Path(__file__).resolve().parents[1]


def t_of_step(num_steps):
    """The t of each step index of the quad schedule (index 0 = noisiest)."""
    return torch.tensor(timesteps(num_steps, "quad")[::-1], dtype=torch.float32)


SCALE = 2048  # keeps the codes below the reader's plausibility bound on |x|, exactly (a power of two)


def code(x):
    """The 1000 i + j that ``encoded`` stored in an xs entry."""
    return (x * SCALE).long()


def encoded(num_steps=100, n=6, extra_x=True):
    """xs[i][j] is filled with (1000 i + j) / SCALE, so every selected entry tells where it came from (``code``);
    ts[i][j] is the t of step i in the quad schedule."""
    i = torch.arange(num_steps + extra_x, dtype=torch.float32)[:, None]
    j = torch.arange(n, dtype=torch.float32)[None, :]
    xs = ((1000 * i + j) / SCALE)[:, :, None, None, None].expand(-1, -1, *IMG).clone()
    ts = t_of_step(num_steps)[:, None].expand(-1, n).clone()
    return xs, ts


def reference_selection(sample_data, cali_st, cali_n):
    """Q-Diffusion's get_train_samples (qdiff/utils.py) for cali_st > 1."""
    nsteps = len(sample_data["ts"])
    chosen = list(range(0, nsteps, nsteps // cali_st))
    return (torch.cat([sample_data["xs"][i][:cali_n] for i in chosen]),
            torch.cat([sample_data["ts"][i][:cali_n] for i in chosen]))


def write(tmp_path, obj, name="cali.pt"):
    path = tmp_path / name
    torch.save(obj, path)
    return path


# --- selection rule -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n, cali_st", [(100, 20), (101, 20), (7, 3), (20, 20), (5, 1)])
def test_select_steps_is_reference_rule(n, cali_st):
    assert select_steps(range(n), cali_st) == list(range(0, n, n // cali_st))


def test_select_steps_within_segment_and_short_segment(caplog):
    assert len(select_steps(range(101), 20)) == 21  # 101 // 20 = 5: one more step than asked, as in the reference
    assert select_steps(range(25, 50), 5) == [25, 30, 35, 40, 45]
    with caplog.at_level(logging.WARNING):
        assert select_steps(range(90, 93), 5) == [90, 91, 92]
    assert "only 3 steps (90..92) for cali_st=5" in caplog.text
    with pytest.raises(ValueError, match="cali_st must be >= 1, got 0"):
        select_steps(range(10), 0)


# --- reader ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("num_steps, layout", [(100, "stacked"), (101, "list"), (100, "list-long-ts")])
def test_k1_selection_equals_reference(tmp_path, num_steps, layout):
    xs, ts = encoded(num_steps)
    data = {"xs": xs, "ts": ts}
    if layout.startswith("list"):
        data = {"xs": list(xs), "ts": [t.long() if layout.endswith("long-ts") else t for t in ts]}
    path = write(tmp_path, data)
    ref_x, ref_t = reference_selection(data, 20, 4)
    (steps,) = timestep_segments(num_steps, 1)
    got_x, got_t = load_calibration(path, cali_st=20, cali_n=4, steps=steps)
    assert got_x.dtype == got_t.dtype == torch.float32
    assert got_x.shape == (len(select_steps(range(num_steps), 20)) * 4, *IMG) and got_t.shape == (len(got_x),)
    assert torch.equal(got_x, ref_x) and torch.equal(got_t, ref_t.float())
    assert torch.equal(load_calibration(path, 20, 4)[0], got_x)


def test_segment_selection_stays_in_segment(tmp_path):
    path = write(tmp_path, dict(zip(("xs", "ts"), encoded(100))))
    for seg in timestep_segments(100, 4, [10, 40, 70]):
        x, t = load_calibration(path, cali_st=5, cali_n=3, steps=seg)
        step, traj = code(x[:, 0, 0, 0]) // 1000, code(x[:, 0, 0, 0]) % 1000
        assert step.unique().tolist() == select_steps(seg, 5)
        assert traj.tolist() == [0, 1, 2] * len(select_steps(seg, 5))
        assert torch.equal(t, t_of_step(100)[step])


def test_ts_long_and_float_give_float32(tmp_path):
    xs, ts = encoded(10)
    a = load_calibration(write(tmp_path, {"xs": xs, "ts": ts.long()}, "a.pt"), 5, 2)[1]
    b = load_calibration(write(tmp_path, {"xs": xs, "ts": ts.double()}, "b.pt"), 5, 2)[1]
    assert a.dtype == b.dtype == torch.float32 and torch.equal(a, b)


def bad_files():
    xs, ts = encoded(10)
    nan = xs.clone()
    nan[4, 1, 0, 0, 0] = float("nan")
    return {
        "not-mapping": ([xs, ts], r"not a tensor mapping .* got list"),
        "missing-key": ({"xs": xs}, r"missing key\(s\) \['ts'\]"),
        "length": ({"xs": xs[:8], "ts": ts}, "'xs' has 8 steps but 'ts' has 10"),
        "length-long": ({"xs": torch.cat([xs, xs[:2]]), "ts": ts}, "'xs' has 13 steps but 'ts' has 10"),
        "batch": ({"xs": xs, "ts": ts[:, :5]}, "'xs' holds 6 trajectories per step but 'ts' 5"),
        "non-tensor": ({"xs": "abc", "ts": ts}, "'xs' must be a 5-d tensor .* got str"),
        "non-tensor-list": ({"xs": [1, 2], "ts": ts}, "'xs' must be a 5-d tensor .* got list"),
        "ragged-list": ({"xs": [xs[0], xs[1, :, :2]], "ts": ts[:2]}, "'xs' entries must all have one 4-d shape"),
        "ts-dims": ({"xs": xs, "ts": ts[:, :, None]}, "'ts' must be a 2-d tensor"),
        "nan": ({"xs": nan, "ts": ts}, r"non-finite values in 'xs' at step\(s\) \[4\]"),
    }


@pytest.mark.parametrize("case", list(bad_files()))
def test_reader_errors_name_file_and_problem(tmp_path, case):
    obj, match = bad_files()[case]
    path = write(tmp_path, obj)
    with pytest.raises(ValueError, match=match) as e:
        load_calibration(path, cali_st=10, cali_n=2)
    assert str(path) in str(e.value)


def test_reader_errors_other(tmp_path):
    with pytest.raises(FileNotFoundError, match="calibration file not found: .*nope.pt"):
        load_calibration(tmp_path / "nope.pt", 5, 2)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="junk.pt: cannot be read as a weights-only torch file"):
        load_calibration(junk, 5, 2)
    path = write(tmp_path, dict(zip(("xs", "ts"), encoded(10))))
    with pytest.raises(ValueError, match=r"images are \(3, 2, 2\) \(C, H, W\) but the model expects \(3, 32, 32\)"):
        load_calibration(path, 5, 2, image_shape=(3, 32, 32))
    with pytest.raises(ValueError, match="cali_n=7 but the file holds 6 trajectories"):
        load_calibration(path, 5, 7)
    with pytest.raises(ValueError, match=r"step indices \[10\] outside \[0, 9\]"):
        load_calibration(path, 5, 2, steps=[8, 9, 10])


def test_nan_outside_selection_is_ignored(tmp_path):
    xs, ts = encoded(10)
    xs[3, 5] = float("nan")  # step 3 is not selected by cali_st=5, trajectory 5 not by cali_n=2
    xs[0, 5] = float("inf")
    x, _ = load_calibration(write(tmp_path, {"xs": xs, "ts": ts}), 5, 2)
    assert torch.isfinite(x).all()


def test_save_and_meta_roundtrip(tmp_path):
    xs, ts = encoded(10)
    path = save_calibration(tmp_path / "sub" / "c.pt", xs, ts, {"seed": 3, "skip_type": "quad"})
    assert read_calibration_meta(path) == {"seed": 3, "skip_type": "quad"}
    assert torch.equal(torch.load(path, weights_only=True)["xs"], xs)
    assert list((tmp_path / "sub").iterdir()) == [path]  # no temporary file left
    with pytest.raises(FileExistsError, match="c.pt exists"):
        save_calibration(path, xs, ts)
    save_calibration(path, list(xs), list(ts), overwrite=True)
    assert read_calibration_meta(path) is None
    with pytest.raises(ValueError, match="'xs' has 9 steps"):
        save_calibration(tmp_path / "bad.pt", xs[:9], ts)
    assert not (tmp_path / "bad.pt").exists()


# --- DataModule -----------------------------------------------------------------------------------------------------

def test_datamodule_serves_segment(tmp_path, capsys):
    xs, ts = encoded(100)
    path = save_calibration(tmp_path / "c.pt", xs, ts, {"model_sha256": "abc", "num_steps": 100, "skip_type": "quad"})
    dm = CalibrationDataModule(str(path), num_steps=100, k=4, segment=1, cali_st=5, cali_n=3, model_sha256="abc",
                               skip_type="quad")
    dm.setup("fit")  # checks the file; the pairs are selected when the loader is built (or on select())
    assert dm.selected == {} and "calibration data" not in capsys.readouterr().out
    dm.select()
    assert "calibration data" in capsys.readouterr().out
    x, t = dm.pairs(1)
    assert torch.equal(x, load_calibration(path, 5, 3, steps=range(25, 50))[0])
    assert list(dm.selected) == [1] and torch.equal(dm.selected[1][0], x) and torch.equal(dm.selected[1][1], t)
    t_step = t_of_step(100).long().tolist()
    assert dm.summary == [{"segment": 1, "steps": (25, 49), "window": (25, 49), "selected_steps": 5,
                           "t_range": (t_step[25], t_step[45]), "pairs": 15}]
    # one element per training step, each the segment's whole pair set, for as long as the module asks
    stream = iter(dm.train_dataloader())
    for _ in range(3):
        batch = next(stream)
        assert list(batch) == [1] and all(a is b for a, b in zip(batch[1], dm.selected[1]))  # no copies
    assert dm.sha256 == calibration_sha256(path) and dm.meta == {"model_sha256": "abc", "num_steps": 100,
                                                          "skip_type": "quad"}
    both = CalibrationDataModule(str(path), num_steps=100, k=4, segment=[0, 3], cali_st=5, cali_n=3)
    both.select()
    assert list(both.selected) == [0, 3] and [r["segment"] for r in both.summary] == [0, 3]
    every = CalibrationDataModule(str(path), num_steps=100, k=4, cali_st=5, cali_n=3)  # no trainer: all segments
    every.select()
    assert list(every.selected) == [0, 1, 2, 3]


def test_overlap_widens_each_calibration_window_not_the_segments(tmp_path):
    xs, ts = encoded(100)
    path = save_calibration(tmp_path / "c.pt", xs, ts, {"num_steps": 100, "skip_type": "quad"})
    dm = CalibrationDataModule(str(path), num_steps=100, k=4, cali_st=5, cali_n=3, overlap=3)
    dm.select()
    assert dm.segments == [range(0, 25), range(25, 50), range(50, 75), range(75, 100)]  # sampling's cuts unchanged
    windows = [range(0, 28), range(22, 53), range(47, 78), range(72, 100)]  # clipped at both ends of the schedule
    for s, window in enumerate(windows):
        assert dm.window(s) == window
        x, t = dm.selected[s]
        assert torch.equal(x, load_calibration(path, 5, 3, steps=window)[0])
        # xs encode 1000 * step + trajectory: the pairs come from the window's steps by the reference rule
        assert sorted(set((code(x[:, 0, 0, 0]) // 1000).tolist())) == select_steps(window, 5)
    assert [r["window"] for r in dm.summary] == [(w[0], w[-1]) for w in windows]
    assert CalibrationDataModule(str(path), num_steps=100, k=4).window(1) == range(25, 50)  # default: no overlap


@pytest.mark.parametrize("overlap", [-1, 1.5, "2"])
def test_overlap_must_be_a_step_count(tmp_path, overlap):
    with pytest.raises(ValueError, match=f"overlap must be an integer number of steps >= 0, got {overlap!r}"):
        CalibrationDataModule(str(tmp_path / "c.pt"), num_steps=100, k=4, overlap=overlap)


def test_datamodule_checks_the_model(tmp_path):
    xs, ts = encoded(10)
    path = save_calibration(tmp_path / "c.pt", xs, ts, {"model_sha256": "abc", "num_steps": 10})
    dm = CalibrationDataModule(str(path), num_steps=10, cali_st=5, cali_n=2)
    dm.check_model(list(IMG), "abc")
    with pytest.raises(ValueError, match=r"images are \(3, 2, 2\) \(C, H, W\) but the model expects \(3, 16, 16\)"):
        dm.check_model([3, 16, 16])
    with pytest.raises(ValueError, match="made for another setup .*model_sha256: file has 'abc', expected 'def'"):
        dm.check_model(model_sha256="def")


@pytest.mark.parametrize("kwargs, match", [
    ({"model_sha256": "other"}, "made for another setup .*model_sha256: file has 'abc', expected 'other'"),
    ({"skip_type": "uniform"}, "skip_type: file has 'quad', expected 'uniform'"),
    ({"num_steps": 50}, "holds 100 sampling steps but num_steps=50"),
    ({"segment": 4}, r"segment index 4 outside \[0, 3\]"),
])
def test_datamodule_mismatch(tmp_path, kwargs, match):
    xs, ts = encoded(100)
    path = save_calibration(tmp_path / "c.pt", xs, ts, {"model_sha256": "abc", "num_steps": 100, "skip_type": "quad"})
    with pytest.raises(ValueError, match=match):
        CalibrationDataModule(str(path), **{"num_steps": 100, "k": 4, "cali_st": 5, "cali_n": 3, **kwargs}).setup()


def test_file_meta_mismatch_on_num_steps(tmp_path):
    xs, ts = encoded(10)
    path = save_calibration(tmp_path / "c.pt", xs, ts, {"num_steps": 11})
    with pytest.raises(ValueError, match="num_steps: file has 11, expected 10"):
        CalibrationDataModule(str(path), num_steps=10, cali_st=5, cali_n=2).setup()


# --- ts against the sampling schedule --------------------------------------------------------------------------------

def datamodule(path, num_steps=10, skip_type="quad", **kw):
    dm = CalibrationDataModule(str(path), num_steps=num_steps, k=2, segment=[0, 1], cali_st=5, cali_n=2,
                               skip_type=skip_type, **kw)
    dm.setup()
    dm.select()
    return dm


@pytest.mark.parametrize("edit, step, traj, got", [
    (lambda ts: ts.zero_(), 0, 0, 0),                             # all-zero ts
    (lambda ts: ts[4, 3].fill_(1), 4, 3, 1),                      # one entry off
    (lambda ts: ts.copy_(1000 - torch.arange(10.0)[:, None]), 0, 0, 1000),  # another schedule
])
def test_ts_that_do_not_follow_the_schedule_are_refused(tmp_path, edit, step, traj, got):
    xs, ts = encoded(10)
    edit(ts)
    path = save_calibration(tmp_path / "c.pt", xs, ts)
    want = int(t_of_step(10)[step])
    with pytest.raises(ValueError, match=rf"c.pt: 'ts' does not follow the sampling schedule: first difference at "
                                         rf"step index {step} \(trajectory {traj}\): the file has t={got}, the "
                                         rf"schedule expects t={want}"):
        datamodule(path)


def test_ts_for_another_skip_type_are_refused(tmp_path):
    path = save_calibration(tmp_path / "c.pt", *encoded(10))  # quad
    with pytest.raises(ValueError, match="first difference at step index 0 .* the file has t=800, the schedule "
                                         "expects t=900"):
        datamodule(path, skip_type="uniform")


def test_ascending_file_is_reindexed_explicitly(tmp_path, caplog):
    xs, ts = encoded(10)
    descending = save_calibration(tmp_path / "desc.pt", xs, ts)
    # the other convention: entries in ascending t, xs[i] still paired with ts[i] (the final sample stays last)
    ascending = save_calibration(tmp_path / "asc.pt", torch.cat([xs[:10].flip(0), xs[10:]]), ts.flip(0))
    with caplog.at_level(logging.WARNING, logger="mmqdiff.data.calibration"):
        asc = datamodule(ascending)
    assert "asc.pt: ts run in ascending order (t=0 first); re-indexed so that step index 0 is the noisiest step " \
           "(t=800)" in caplog.text
    desc = datamodule(descending)
    assert "desc.pt" not in caplog.text
    for s in (0, 1):
        got, want = asc.pairs(s), desc.pairs(s)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert asc.summary == desc.summary and desc.summary[0]["t_range"] == (800, int(t_of_step(10)[4]))


# --- generator ------------------------------------------------------------------------------------------------------

TINY = {"data": {"image_size": 8, "channels": 3},
        "model": {"ch": 32, "out_ch": 3, "ch_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [],
                  "dropout": 0.0, "resamp_with_conv": True},
        "diffusion": {"beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02, "num_diffusion_timesteps": 1000}}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    (d / "tiny.yaml").write_text(yaml.safe_dump(TINY))
    torch.manual_seed(0)
    model = build_model(TINY).eval()
    torch.save(model.state_dict(), d / "tiny.pt")
    return model, str(d / "tiny.yaml"), str(d / "tiny.pt")


def generate(tiny, path, batch_size, n=5, num_steps=4, seed=3, eta=0.0, checkpoint=None):
    from lightning.pytorch import Trainer
    _, config, ckpt = tiny
    ckpt = checkpoint or ckpt
    trainer = Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, callbacks=[CalibrationWriter(str(path))],
                      default_root_dir=str(path.parent))
    module = CalibrationGenerator(config, ckpt, num_steps=num_steps, skip_type="quad", eta=eta, seed=seed)
    trainer.predict(module, datamodule=TrajectoryDataModule(n, batch_size), return_predictions=False)
    return torch.load(path, weights_only=True)


def test_generator_matches_ddim_sample_and_reads_back(tiny, tmp_path):
    model, config, ckpt = tiny
    path = tmp_path / "gen.pt"
    cli.main(["predict", "--config", str(ROOT / "configs/embedded/gen_calib.yaml"), "--model.init_args.config", config,
              "--model.init_args.checkpoint", ckpt, "--model.init_args.num_steps", "4", "--model.init_args.seed", "3",
              "--data.init_args.num_trajectories", "5", "--data.init_args.batch_size", "2",
              "--trainer.accelerator", "cpu",
              "--trainer.default_root_dir", str(tmp_path), "--trainer.callbacks.init_args.path", str(path)])
    obj = torch.load(path, weights_only=True)
    assert obj["xs"].shape == (5, 5, 3, 8, 8) and obj["ts"].shape == (4, 5) and obj["ts"].dtype == torch.float32
    assert obj["meta"] == {"model_sha256": state_dict_sha256(model), "checkpoint_sha256": file_sha256(ckpt),
                           "checkpoint": ckpt, "config": config, "num_steps": 4, "skip_type": "quad", "eta": 0.0,
                           "seed": 3, "image_shape": [3, 8, 8], "num_trajectories": 5}
    seq = timesteps(4, "quad")
    for batch in ([0, 1], [2, 3], [4]):  # same batches as the run, so the arithmetic is identical
        x_T = torch.cat([torch.randn((1, 3, 8, 8), generator=trajectory_generator(3, j)) for j in batch])
        inputs, ts = [], []
        final = ddim_sample(lambda i: model, x_T, seq, linear_betas(),
                            callback=lambda i, t, x, eps: (inputs.append(x), ts.append(t)))
        assert torch.equal(obj["xs"][:, batch], torch.stack([*inputs, final]))
        assert obj["ts"][:, batch[0]].tolist() == ts == sorted(seq, reverse=True)
    x, t = load_calibration(path, cali_st=4, cali_n=5, image_shape=(3, 8, 8))
    assert torch.equal(x, obj["xs"][:4].reshape(-1, 3, 8, 8)) and torch.equal(t, obj["ts"].reshape(-1))
    with pytest.raises(FileExistsError, match="gen.pt exists"):
        generate(tiny, path, batch_size=5)


def test_generator_independent_of_batch_size(tiny, tmp_path):
    a = generate(tiny, tmp_path / "a.pt", batch_size=2)
    b = generate(tiny, tmp_path / "b.pt", batch_size=5)
    assert torch.equal(a["ts"], b["ts"]) and a["meta"] == b["meta"]
    assert torch.equal(a["xs"][0], b["xs"][0])  # same noise
    torch.testing.assert_close(a["xs"], b["xs"], rtol=1e-4, atol=1e-4)  # BLAS may sum a batch differently


def test_eta_noise_is_per_trajectory(tiny):
    model = tiny[0]
    seq, betas = timesteps(3, "quad"), linear_betas()
    batch, _ = record_trajectories(model, [4, 1, 2], 9, seq, betas, 0.5, (3, 8, 8))
    for col, j in enumerate([4, 1, 2]):
        g = trajectory_generator(9, j)
        x_T = torch.randn((1, 3, 8, 8), generator=g)
        alone = ddim_sample(lambda i: model, x_T, seq, betas, eta=0.5, generator=g)
        torch.testing.assert_close(batch[-1, col:col + 1], alone, rtol=1e-4, atol=1e-4)


def test_diverging_trajectories_are_not_written(tiny, tmp_path):
    model = tiny[0]
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    sd["conv_out.weight"] *= 1e36  # finite weights whose noise prediction overflows float32
    torch.save(sd, tmp_path / "huge.pt")
    path = tmp_path / "gen.pt"
    with pytest.raises(ValueError, match=r"gen.pt: not written: trajectory 0 holds non-finite values \(first at "
                                         r"(step index [1-3]|the final sample)\)"):
        generate(tiny, path, batch_size=5, checkpoint=str(tmp_path / "huge.pt"))
    assert not path.exists()


@pytest.fixture
def counted_steps(monkeypatch):
    """How many batches the generator ran."""
    calls = []
    step = CalibrationGenerator.predict_step
    monkeypatch.setattr(CalibrationGenerator, "predict_step", lambda self, *a: calls.append(1) or step(self, *a))
    return calls


def test_unwritable_target_fails_before_any_trajectory(tiny, tmp_path, counted_steps):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(OSError, match=str(blocker)):
        generate(tiny, blocker / "gen.pt", batch_size=2)
    assert counted_steps == []


def test_locked_target_is_refused_before_any_trajectory(tiny, tmp_path, counted_steps):
    path = tmp_path / "gen.pt"
    with foreign_lock(tmp_path / "gen.pt.lock"):
        with pytest.raises(RuntimeError, match=f"calibration-data target {path} is in use by pid 4242 on host "
                                               "elsewhere"):
            generate(tiny, path, batch_size=2)
    assert counted_steps == [] and not path.exists()
    generate(tiny, path, batch_size=5)
    assert counted_steps == [1] and not (tmp_path / "gen.pt.lock").exists()


def test_writer_rejects_missing_or_repeated_indices(tmp_path):
    part = {"indices": torch.tensor([0, 1, 1]), "xs": torch.zeros(3, 3, *IMG), "ts": torch.zeros(2, 3)}
    with pytest.raises(RuntimeError, match=r"missing \[2, 3\], repeated \[1\]"):
        CalibrationWriter(str(tmp_path / "x.pt"))._assemble([part], 4)


@pytest.mark.slow
def test_generator_two_ranks_write_every_trajectory_once(tiny, tmp_path):
    import subprocess
    import sys
    _, config, ckpt = tiny
    path = tmp_path / "ddp.pt"
    subprocess.run([sys.executable, "cli.py", "predict", "--config", "configs/embedded/gen_calib.yaml",
                    "--model.init_args.config", config, "--model.init_args.checkpoint", ckpt,
                    "--model.init_args.num_steps", "4", "--model.init_args.seed", "3",
                    "--data.init_args.num_trajectories", "5", "--data.init_args.batch_size", "2",
                    "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp",
                    "--trainer.default_root_dir", str(tmp_path), "--trainer.callbacks.init_args.path", str(path)],
                   cwd=ROOT, check=True, capture_output=True)
    one = generate(tiny, tmp_path / "one.pt", batch_size=2)
    two = torch.load(path, weights_only=True)
    assert sorted(p.name for p in tmp_path.glob("*.pt")) == ["ddp.pt", "one.pt"]  # shards removed
    assert two["meta"] == one["meta"] and torch.equal(two["ts"], one["ts"]) and torch.equal(two["xs"][0], one["xs"][0])
    torch.testing.assert_close(two["xs"], one["xs"], rtol=1e-4, atol=1e-4)
