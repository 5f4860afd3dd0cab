"""End-to-end tests of pretrain_mae.py as a user runs it: checkpoint format, kill-and-resume equals an
uninterrupted run, the loss falls, bad input fails cleanly, and two processes under torchrun work.
CPU, vit_nano, a few steps each (about a minute in all)."""

import json
import math
import os

import pytest
import torch

import model as model_module
from conftest import REPO, assert_same_state, load_ckpt, run_here, run_in_process, run_torchrun
from model import MaskedAutoencoder, model_config

SMALL = ["--model", "vit_nano", "--device", "cpu"]
SYNTH = ["--dataset", "synthetic", *SMALL, "--batch_size", "32", "--pictures", "0"]


def _ok(r):
    assert r.returncode == 0, f"exit {r.returncode}\nstdout:\n{r.stdout[-3000:]}\nstderr:\n{r.stderr[-3000:]}"
    return r


def _log(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.slow
def test_cifar_run_writes_checkpoint_log_and_pictures(needs_cifar, tmp_path):
    out = tmp_path / "run"
    r = _ok(run_here("pretrain_mae.py", "--dataset", "imagefolder", "--data_path", needs_cifar, "--img_size", "32",
                     *SMALL, "--max_steps", "5", "--batch_size", "64", "--log_every", "5", "--out_dir", out))
    assert "img/s" in r.stdout
    ckpt = load_ckpt(out / "ckpt.pt")
    assert ckpt["stage"] == "mae" and ckpt["step"] == 5
    assert ckpt["config"] == model_config("vit_nano", 32, 4, 3)
    assert type(ckpt["args"]) is dict and ckpt["args"]["max_steps"] == 5 and ckpt["args"]["dataset"] == "imagefolder"
    assert all(isinstance(v, (int, float, str, bool, type(None))) for v in ckpt["args"].values())
    assert {"state", "param_groups"} <= set(ckpt["optimizer"])
    assert all(int(s["step"]) == 5 for s in ckpt["optimizer"]["state"].values())  # AdamW took exactly 5 steps
    # the raw module's state dict (no _orig_mod./module. prefixes) that rebuilds from the saved config
    model = MaskedAutoencoder(**ckpt["config"])
    model.load_state_dict(ckpt["model"], strict=True)
    records = _log(out / "log.jsonl")
    assert records and records[-1]["step"] == 5 and math.isfinite(records[-1]["loss"])
    assert list(out.glob("recon_*.png"))
    assert not list(out.glob("*.tmp"))  # the temp file was renamed


@pytest.mark.slow
def test_resume_equals_uninterrupted_run(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    common = [*SYNTH, "--epochs", "2", "--log_every", "1"]  # the schedule spans --epochs: same in every run
    _ok(run_here("pretrain_mae.py", *common, "--max_steps", "6", "--save_every", "3", "--out_dir", a))
    _ok(run_here("pretrain_mae.py", *common, "--max_steps", "3", "--out_dir", b))
    r = _ok(run_here("pretrain_mae.py", *common, "--max_steps", "6", "--resume", "--out_dir", b))
    assert "resumed" in r.stdout
    ca, cb = load_ckpt(a / "ckpt.pt"), load_ckpt(b / "ckpt.pt")
    assert ca["step"] == cb["step"] == 6
    assert_same_state(ca, cb)
    # the losses of steps 4-6 are the same too (log lines of the resumed run are appended)
    la = {r["step"]: r["loss"] for r in _log(a / "log.jsonl")}
    lb = {r["step"]: r["loss"] for r in _log(b / "log.jsonl")}
    assert [la[s] for s in (4, 5, 6)] == [lb[s] for s in (4, 5, 6)]


@pytest.mark.slow
def test_loss_falls(tmp_path):
    out = tmp_path / "run"
    _ok(run_here("pretrain_mae.py", *SYNTH, "--epochs", "1", "--warmup_epochs", "0.05", "--blr", "1.5e-3",
                 "--max_steps", "30", "--log_every", "3", "--out_dir", out))
    losses = [r["loss"] for r in _log(out / "log.jsonl")]
    assert len(losses) == 10 and all(math.isfinite(x) for x in losses)
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < 0.8 * first, losses



@pytest.mark.parametrize("args,text", [
    (["--dataset", "imagefolder", "--data_path", "/nonexistent/folder", "--img_size", "32"], "does not exist"),
    (["--dataset", "imagenet22k"], "unknown dataset"),
    (["--dataset", "synthetic", "--model", "vit_gigantic"], "invalid choice"),  # argparse's own error line
    (["--dataset", "synthetic", "--img_size", "30", "--patch_size", "4"], "not divisible"),
    (["--dataset", "synthetic", "--resume"], "no checkpoint"),
    (["--dataset", "synthetic", "--nnclr_weight", "1", "--compile_mode", "reduce-overhead"], "plain MAE"),
    (["--dataset", "synthetic", "--out_dir", "A_FILE/run"], "is a file"),
], ids=["missing_data_path", "unknown_dataset", "unknown_model", "img_not_divisible", "resume_without_ckpt",
        "cuda_graphs_with_joint", "out_dir_under_a_file"])
def test_bad_input_fails_cleanly(tmp_path, args, text):
    """Exit 2, one error line naming the problem, no traceback, nothing written."""
    out = tmp_path / "run"
    (tmp_path / "a_file").write_text("")
    args = [a.replace("A_FILE", str(tmp_path / "a_file")) for a in args]
    model = [] if "--model" in args else ["--model", "vit_nano"]
    code, _, err = run_in_process("pretrain_mae.py", *model, "--device", "cpu",
                                  "--max_steps", "2", "--batch_size", "32", "--out_dir", out, *args)
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if "error:" in line]
    assert len(errors) == 1 and text in errors[0], err
    if "--model" not in args:  # our own errors are exactly one line, `error: ...` (argparse adds usage lines)
        assert lines == errors and errors[0].startswith("error: "), err
    assert "Traceback" not in err
    assert not (out / "ckpt.pt").exists()


@pytest.mark.slow
@pytest.mark.multiprocess
def test_batch_not_divisible_by_world_size(needs_torchrun, tmp_path):
    out = tmp_path / "run"
    r = run_torchrun("pretrain_mae.py", "--dataset", "synthetic", *SMALL, "--batch_size", "33", "--max_steps", "2",
                     "--out_dir", out, timeout=90)
    assert r.returncode != 0
    said = [line for line in (r.stdout + r.stderr).splitlines() if line.startswith("error: ")]
    assert said == ["error: --batch_size 33 is not divisible by the 2 processes"], r.stderr[-2000:]  # rank 0 only
    assert not (out / "ckpt.pt").exists()
    r = run_torchrun("pretrain_mae.py", *SMALL, "--epochs", "0", "--out_dir", out, timeout=90)  # the parser's
    said = [line for line in (r.stdout + r.stderr).splitlines() if line.startswith("error: ")]
    assert r.returncode != 0 and said == ["error: argument --epochs: 0 is not a positive integer (see --help)"], said


SEED_SPY = """
import json, os
import common
_seed_step = common.seed_step
def seed_step(seed, rank, step):  # records each call, per process, then does what it did
    with open(os.path.join(os.environ["SPY_DIR"], "calls_" + os.environ["RANK"] + ".jsonl"), "a") as f:
        f.write(json.dumps([seed, rank, step]) + "\\n")
    return _seed_step(seed, rank, step)
common.seed_step = seed_step
"""


@pytest.mark.slow
@pytest.mark.multiprocess
def test_ddp_two_processes_smoke(needs_torchrun, tmp_path):
    """Two processes: the checkpoint and log as one process writes them; the lr counts the global batch (64, not
    32 per process: 7 warm-up steps as in test_peak_lr_counts_the_views); and each process reseeds every step with
    its own rank (the same draws on both ranks would shrink the augmentation, silently)."""
    out, spy = tmp_path / "run", tmp_path / "shim"
    spy.mkdir()
    (spy / "sitecustomize.py").write_text(SEED_SPY)  # from outside: no test hook in the production code
    env = {"PYTHONPATH": os.pathsep.join([str(spy), str(REPO)]), "SPY_DIR": str(tmp_path)}
    r = run_torchrun("pretrain_mae.py", "--dataset", "synthetic", *SMALL, "--batch_size", "64", "--pictures", "0",
                     "--epochs", "1", "--warmup_epochs", "0.1", "--blr", "3e-4", "--max_steps", "3", "--log_every", "1",
                     "--out_dir", out, timeout=120, env=env)
    assert r.returncode == 0, f"exit {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    ckpt = load_ckpt(out / "ckpt.pt")
    assert ckpt["step"] == 3 and ckpt["stage"] == "mae"
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in ckpt["model"])
    assert '"world": 2' in r.stdout
    log = _log(out / "log.jsonl")
    assert len(log) == 3  # rank 0 alone writes the log
    assert [row["lr"] for row in log] == pytest.approx([3e-4 * 64 / 256 * s / 7 for s in range(3)])
    for rank in (0, 1):
        assert _log(tmp_path / f"calls_{rank}.jsonl") == [[0, rank, s] for s in range(3)]


def test_short_run_logs_its_last_step(tmp_path):
    out = tmp_path / "run"
    code, stdout, err = run_in_process("pretrain_mae.py", *SYNTH, "--max_steps", "2",
                                       "--log_every", "20", "--out_dir", out)
    assert code == 0 and (out / "ckpt.pt").exists(), err
    assert "img/s" in stdout
    assert _log(out / "log.jsonl")[-1]["step"] == 2


@pytest.mark.parametrize("views", [1, 2])
def test_peak_lr_counts_the_views(tmp_path, views):
    """lr = blr * batch * views / 256: one view per image by default (facebookresearch/mae), two with --num_views 2
    (the MAE-CT authors'), reached at the end of the warm-up: 64 images a step, 78 steps an epoch, warm-up 0.1 epoch
    = 7 steps; step s runs at lr_at(s - 1), so the 8th logged step is the first at the peak."""
    _ok(run_here("pretrain_mae.py", "--dataset", "synthetic", *SMALL, "--batch_size", "64", "--pictures", "0",
                 "--epochs", "1", "--warmup_epochs", "0.1", "--max_steps", "8", "--log_every", "1", "--blr", "3e-4",
                 "--num_views", views, "--out_dir", tmp_path))
    lrs = [r["lr"] for r in _log(tmp_path / "log.jsonl") if "lr" in r]
    assert lrs == pytest.approx([3e-4 * 64 * views / 256 * s / 7 for s in range(8)])


def test_resume_refuses_other_training_settings(tmp_path):
    """--resume continues the saved schedule step by step: another batch or epoch count would silently change it,
    so it is refused (nothing written); how often it logs, where it stops (--max_steps) and the lr may change."""
    out = tmp_path / "run"
    _ok(run_here("pretrain_mae.py", *SYNTH, "--epochs", "2", "--max_steps", "2", "--out_dir", out))
    for flags, text in [(["--epochs", "3"], "was trained with --epochs 2 (now 3), --warmup_epochs 0.1 (now 0.15)"),
                        (["--epochs", "2", "--batch_size", "16", "--seed", "5"], "--batch_size 32 (now 16), --seed 0 (now 5)")]:
        before = (out / "ckpt.pt").read_bytes()
        code, _, err = run_in_process("pretrain_mae.py", *SYNTH, *flags, "--max_steps", "3", "--resume", "--out_dir", out)
        assert code == 2 and err.strip().startswith("error: ") and text in err, err[-2000:]
        assert (out / "ckpt.pt").read_bytes() == before
    _ok(run_here("pretrain_mae.py", *SYNTH, "--epochs", "2", "--max_steps", "3", "--log_every", "1", "--blr", "1e-4",
                 "--resume", "--out_dir", out))  # a lower lr after a divergence, say
    assert load_ckpt(out / "ckpt.pt")["step"] == 3


def test_defaults_are_the_papers():
    """MAE's recipe: 75% of the patches masked, the loss on per-patch normalised pixels."""
    from pretrain_mae import parse_args
    args = parse_args([])
    assert args.mask_ratio == 0.75 and args.no_norm_pix_loss is False
    assert MaskedAutoencoder(**model_config("vit_nano", 32, 4, 3)).norm_pix_loss is True


@pytest.mark.parametrize("joint", [False, True], ids=["plain", "joint"])
def test_mask_ratio_and_norm_pix_flags_reach_the_model(tmp_path, monkeypatch, joint):
    """--mask_ratio is the fraction of patches every training step masks (of 64 patches, 32 at 0.5, 16 at 0.25; in
    the joint ablation, of both views) and --no_norm_pix_loss turns the normalised target off, not a constant."""
    import model
    seen, real = [], model.VisionTransformer.random_masking

    def random_masking(self, x, mask_ratio, noise=None):  # records each step's masks and the model's target
        kept, mask, ids_restore = real(self, x, mask_ratio, noise)
        seen.append((tuple(mask.shape), mask.sum(1).unique().tolist(), self.norm_pix_loss))
        return kept, mask, ids_restore
    monkeypatch.setattr(model.VisionTransformer, "random_masking", random_masking)
    if joint:  # the joint run on the default target, the plain one without it
        flags, expected = ["--nnclr_weight", "1", "--mask_ratio", "0.25", "--proj_hidden", "32", "--proj_dim", "16",
                           "--pred_hidden", "32"], ((64, 64), [16.0], True)
    else:
        flags, expected = ["--mask_ratio", "0.5", "--no_norm_pix_loss"], ((32, 64), [32.0], False)
    _ok(run_here("pretrain_mae.py", *SYNTH, *flags, "--max_steps", "2", "--out_dir", tmp_path))
    assert seen == [expected] * 2


def test_eval_split_smaller_than_the_ranks_is_refused_at_start(tmp_path, monkeypatch):
    """With --eval_every, the k-NN deals the val split out to the ranks; fewer val images than ranks is refused
    before training, not at the first evaluation. Two ranks are faked by the world size setup reports (the
    refusal comes before anything talks to another rank)."""
    import dataclasses
    import common
    import data
    setup = common.setup
    monkeypatch.setattr(common, "setup", lambda args: dataclasses.replace(setup(args), world=2))
    monkeypatch.setattr(data, "SYNTHETIC_SIZES", {**data.SYNTHETIC_SIZES, "val": 1})
    out = tmp_path / "run"
    code, _, err = run_in_process("pretrain_mae.py", *SYNTH, "--eval_every", "1", "--max_steps", "2", "--out_dir", out)
    assert code == 2 and "error: val has 1 images, fewer than the 2 processes" in err, err
    assert not out.exists()


@pytest.mark.parametrize("wd", [0.05, 0.2])
def test_adamw_gets_the_mae_weight_decay_and_betas(tmp_path, wd):
    """--weight_decay on the matrices, none on biases, norms and tokens; AdamW betas (0.9, 0.95) (MAE). After one
    step m = (1 - b1) g and v = (1 - b2) g^2, so v = 5 m^2 whatever the gradient: this checks the betas in use."""
    code, _, err = run_in_process("pretrain_mae.py", *SYNTH, "--max_steps", "1", "--weight_decay", wd,
                                  "--out_dir", tmp_path)
    assert code == 0, err
    opt = load_ckpt(tmp_path / "ckpt.pt")["optimizer"]
    assert [g["weight_decay"] for g in opt["param_groups"]] == [wd, 0.0]
    assert all(tuple(g["betas"]) == (0.9, 0.95) for g in opt["param_groups"])
    for state in opt["state"].values():
        torch.testing.assert_close(state["exp_avg_sq"], 5 * state["exp_avg"] ** 2, rtol=1e-4, atol=1e-30)


def test_adamw_sees_the_gradient_of_the_loss_unchanged(tmp_path, monkeypatch):
    """Nothing between backward and the optimiser step (MAE clips nothing): the gradients AdamW steps on are the
    loss's, recomputed here with autograd. (Adam ignores a gradient's scale on its first step, so a clip would
    not show in the weights of a short run.)"""
    wanted, seen = [], []
    forward, adamw_step = model_module.MaskedAutoencoder.forward, torch.optim.AdamW.step

    def spy_forward(self, imgs, mask_ratio=0.75, noise=None):
        out = forward(self, imgs, mask_ratio, noise)
        params = [p for p in self.parameters() if p.requires_grad]
        wanted.append(sorted(float(g.norm()) for g in torch.autograd.grad(out[0], params, retain_graph=True)))
        return out

    def spy_step(self, *a, **k):
        seen.append(sorted(float(p.grad.norm()) for g in self.param_groups for p in g["params"]))
        return adamw_step(self, *a, **k)
    monkeypatch.setattr(model_module.MaskedAutoencoder, "forward", spy_forward)
    monkeypatch.setattr(torch.optim.AdamW, "step", spy_step)
    code, _, err = run_in_process("pretrain_mae.py", *SYNTH, "--max_steps", "2", "--out_dir", tmp_path)
    assert code == 0, err
    assert len(wanted) == len(seen) == 2
    for w, s in zip(wanted, seen):
        assert s == pytest.approx(w, rel=1e-5)


def test_two_views_of_an_image_are_masked_independently(tmp_path, monkeypatch):
    """--num_views 2 (the MAE-CT authors' stage 1): each view gets masks of its own, as a second image would."""
    masks, random_masking = [], model_module.VisionTransformer.random_masking

    def spy(self, x, mask_ratio, noise=None):
        out = random_masking(self, x, mask_ratio, noise)
        masks.append(out[1])
        return out
    monkeypatch.setattr(model_module.VisionTransformer, "random_masking", spy)
    code, _, err = run_in_process("pretrain_mae.py", *SYNTH, "--num_views", "2", "--max_steps", "1",
                                  "--out_dir", tmp_path)
    assert code == 0, err
    (mask,) = masks
    assert mask.shape == (64, 64)  # 2 views x 32 images, 8 x 8 patches
    assert (mask[:32] != mask[32:]).any(dim=1).all()
