"""common.py's small pieces whose mistakes a stage run would not show: the model-init seed, the progress line's
img/s and ETA, the non-finite stop and the strict-load message. CPU, under a second."""
import argparse
import json
import types

import pytest
import torch

import common
from model import VisionTransformer, model_config


def test_setup_seeds_the_model_init_with_the_runs_seed():
    """Seeds differ in their initial weights too, not only in their data order and crops (seed_step): the
    seed-to-seed spread in RESULTS.md depends on it."""
    # setup() turns TF32 off: restored after the test by hand (pytest >= 9.2's monkeypatch deletes, on undo, an
    # attribute that torch's flag modules resolve dynamically, and fails)
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        with torch.random.fork_rng():
            inits = []
            for seed in (7, 7, 8):
                common.setup(argparse.Namespace(device="cpu", batch_size=8, seed=seed, precision=None, compile=None))
                assert torch.initial_seed() == seed
                inits.append(torch.nn.Linear(4, 4).weight.detach().clone())
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    assert torch.equal(inits[0], inits[1]) and not torch.equal(inits[0], inits[2])


def test_a_single_process_on_cuda_n_makes_gpu_n_the_current_device(monkeypatch):
    """--device cuda:1 without torchrun: GPU 1 becomes the current device (torch.cuda's memory statistics, events
    and CUDA graphs follow the current device, not the tensors: before, they all read GPU 0); a GPU that is not
    there is one error line. No GPU here: torch.cuda is stood in for by recorders."""
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", calls.append)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32  # as the test above
    try:
        with torch.random.fork_rng(devices=[]):  # the CPU generator only: there is no GPU to save
            for dev in ("cuda:1", "cuda"):
                proc = common.setup(argparse.Namespace(device=dev, batch_size=8, seed=0, precision=None, compile=None))
                assert proc.device == torch.device(dev)
            assert calls == [1]  # plain "cuda" keeps the current device
            with pytest.raises(common.UserError, match="only 2 GPU"):
                common.setup(argparse.Namespace(device="cuda:2", batch_size=8, seed=0, precision=None, compile=None))
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32


def test_seed_step_draws_differ_with_the_seed_too():
    """--seed changes every per-step draw (masks, crops, top-k picks), not only the init: a seed sweep that
    repeated the same draws would report a spread too small. Seeds 0-2 x ranks 0-1 x steps 0-49, all distinct."""
    seeds = set()
    with torch.random.fork_rng(devices=[]):
        for seed in range(3):
            for rank in range(2):
                for step in range(50):
                    common.seed_step(seed, rank, step)
                    seeds.add(torch.initial_seed())
    assert len(seeds) == 3 * 2 * 50


def test_progress_line_counts_the_images_since_the_last_line(monkeypatch, tmp_path, capsys):
    """A run resumed at step 40 logs every 10 steps of 10 images: its first line's img/s counts the 10 steps
    since the resume (not 50) and says that it includes startup, the next the 10 since the first line, one after an
    evaluation the steps since it; the ETA is for the steps left to --max_steps (80), not to the schedule's end."""
    clock = iter([0.0, 5.0, 5.0, 6.0, 6.0, 16.0, 17.0, 17.0])  # start; lines at 5 s and 6 s; an eval to 16 s; line
    monkeypatch.setattr(common, "time", types.SimpleNamespace(time=lambda: next(clock)))  # common's clock only
    proc = common.Proc(0, 1, torch.device("cpu"), torch.float32)
    log = common.Logger(proc, tmp_path, total_steps=100, start_step=40, images_per_step=10, every=10, last_step=80)
    log(50, loss=1.0)
    log(60, loss=1.0)
    log.event(60, knn10=50.0)  # the eval took 10 s: the next line leaves it out
    log(70, loss=1.0)
    lines = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r.get("img_per_s") for r in lines] == [20.0, 100.0, None, 100.0]
    first, second = capsys.readouterr().out.splitlines()[:2]
    assert first.startswith("step 50/80 (--max_steps; schedule 100) loss 1")  # 300 images at 20/s; no GPU memory on CPU
    assert first.endswith("| 20 img/s (startup and compilation included) | ETA 0.2 min")
    assert second.endswith("| 100 img/s | ETA 0.0 min")


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_check_finite_stops_on_nan_and_on_inf(value, tmp_path):
    ckpt = tmp_path / "ckpt.pt"
    common.check_finite(torch.tensor(1.5), 3, str(ckpt))  # a finite loss passes
    with pytest.raises(common.UserError, match="non-finite loss at step 3: stopping; no checkpoint was saved"):
        common.check_finite(torch.tensor(value), 3, str(ckpt))  # before the first save
    ckpt.write_bytes(b"")
    with pytest.raises(common.UserError, match=f"non-finite loss at step 3: stopping; the last good checkpoint is {ckpt}"):
        common.check_finite(torch.tensor(value), 3, str(ckpt))


def test_load_strict_names_what_is_missing_unexpected_or_misshapen():
    enc = VisionTransformer(**model_config("vit_nano", 32, 4, 3))
    sd = dict(enc.state_dict())
    sd.pop("norm.weight")
    sd["extra"] = torch.zeros(1)
    sd["norm.bias"] = torch.zeros(3)
    with pytest.raises(common.UserError, match=r"^f.pt does not match the model: missing \['norm.weight'\]; "
                                               r"unexpected \['extra'\]; wrong shape \['norm.bias \(3,\) vs \(64,\)'\]$"):
        common.load_strict(enc, sd, "f.pt")


# ---------------------------------------------------------------- flags
@pytest.mark.parametrize("script,flags,text", [
    ("pretrain_mae.py", ["--epochs", "0"], "--epochs: 0 is not a positive integer"),
    ("pretrain_mae.py", ["--max_steps", "-3"], "--max_steps: -3 is not a positive integer"),
    ("pretrain_mae.py", ["--batch_size", "0"], "--batch_size: 0 is not a positive integer"),
    ("pretrain_mae.py", ["--log_every", "0"], "--log_every: 0 is not a positive integer"),
    ("pretrain_mae.py", ["--mask_ratio", "1.0"], "--mask_ratio: 1.0 is not in (0, 1)"),
    ("pretrain_mae.py", ["--blr", "-1"], "--blr: -1 is not positive"),
    ("pretrain_mae.py", ["--warmup_epochs", "-1"], "--warmup_epochs: -1 is not 0 or more"),
    ("pretrain_mae.py", ["--num_views", "0"], "--num_views: 0 is not a positive integer"),
    ("pretrain_mae.py", ["--device", "tpu"], "--device tpu: use cuda, cuda:N or cpu"),
    ("pretrain_mae.py", ["--warmup_epochs", "inf"], "--warmup_epochs: inf is not 0 or more"),
    ("init_head.py", ["--queue_size", "0"], "--queue_size: 0 is not a positive integer"),
    ("init_head.py", ["--crop_min", "0"], "--crop_min: 0 is not in (0, 1]"),
    ("init_head.py", ["--temperature", "0"], "--temperature: 0 is not positive"),
    ("contrastive_tune.py", ["--topk", "0"], "--topk: 0 is not a positive integer"),
    ("evaluate.py", ["--kmeans_seeds", "0"], "--kmeans_seeds: 0 is not a positive integer"),
    ("evaluate.py", ["--knn_k", "10", "0"], "--knn_k: 0 is not a positive integer"),
    ("evaluate.py", ["--chunk", "0"], "--chunk: 0 is not a positive integer"),
    ("evaluate.py", ["--probe_epochs", "0"], "--probe_epochs: 0 is not a positive integer"),
    ("evaluate.py", ["--epochs", "3"], "unrecognized arguments: --epochs 3"),
    ("pretrain_mae.py", ["--max_step", "5"], "unrecognized arguments: --max_step 5"),  # not taken for --max_steps
])
def test_a_bad_flag_value_is_one_error_line_before_anything_runs(tmp_path, script, flags, text):
    """Values no run can use are refused by the parser (argparse's message, in the scripts' one-line form), not met
    later as a traceback or, for --epochs 0, as 'done: 0 steps' with no checkpoint."""
    from tests.conftest import run_in_process
    init = [] if script == "pretrain_mae.py" else ["--init_from", tmp_path / "none.pt"]
    device = [] if "--device" in flags else ["--device", "cpu"]
    code, _, err = run_in_process(script, *init, *flags, *device, "--out_dir", tmp_path / "o")
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and text in lines[0], err[-2000:]
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("flags,text", [(["--stages", "foo"], "--stages foo: choose from mae, head, ct, features"),
                                        (["--model", "foo"], "--model: invalid choice: 'foo'"),
                                        (["--img_size", "30"], "image size 30 is not divisible by patch size 4"),
                                        (["--steps", "0"], "--steps: 0 is not a positive integer")])
def test_bench_refuses_bad_input_in_one_line(flags, text):
    from tests.conftest import run_in_process
    code, out, err = run_in_process("bench.py", "--device", "cpu", *flags)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and text in lines[0], err[-2000:]
    assert "| stage |" not in out  # no (empty) table


def test_help_shows_each_flags_default():
    p = common.ArgumentParser("doc")
    p.add_argument("--a", type=common.POSITIVE_INT, default=7, help="a count")
    p.add_argument("--b", default=None, help="b (default: the checkpoint's)")
    p.add_argument("--c", type=int, default=0, help="c")
    p.add_argument("--d", action="store_true", help="d")
    text = " ".join(p.format_help().split())
    assert "a count (default: 7)" in text and "b (default: the checkpoint's) " in text and "c (default: 0)" in text
    assert "d (default" not in text


def test_seed_step_never_repeats_a_seed_over_ranks_and_steps():
    """Neighbouring (rank, step) pairs must not share a seed: with rank + step, rank 1 at step s would replay rank
    0's crops and masks of step s + 1."""
    seeds = set()
    for rank in range(4):
        for step in range(300):
            common.seed_step(3, rank, step)
            seeds.add(torch.initial_seed())
    assert len(seeds) == 4 * 300


def test_check_batch_boundary():
    common.check_batch(4, 4)  # one full batch: fine
    with pytest.raises(common.UserError, match="larger than the training set"):
        common.check_batch(5, 4)


def test_check_queue_boundary():
    """A top-k as long as the queue is allowed (the lookup never draws the query's own entries, FAULTS 57); one
    longer is refused."""
    common.check_queue(argparse.Namespace(queue_size=64, batch_size=32, topk=64), 1000)
    with pytest.raises(common.UserError, match="--topk 65 is larger than the queue"):
        common.check_queue(argparse.Namespace(queue_size=64, batch_size=32, topk=65), 1000)


def test_check_out_dir_refuses_a_file_and_a_path_under_one_and_makes_nothing(tmp_path):
    """A run folder that can be made is accepted without being made (nothing written before the run starts);
    one that is a file, or lies under a file, is refused up front. (The no-permission case cannot be set up here:
    the tests run as root, for whom os.access always says yes.)"""
    (tmp_path / "f").write_text("")
    common.check_out_dir(tmp_path / "new" / "deeper")
    common.check_out_dir(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f"]
    with pytest.raises(common.UserError, match="is a file, not a folder"):
        common.check_out_dir(tmp_path / "f")
    with pytest.raises(common.UserError, match=f"{tmp_path / 'f'} is a file"):
        common.check_out_dir(tmp_path / "f" / "run" / "x")
    with pytest.raises(common.UserError, match=f"{tmp_path / 'f'} is a file"):  # os.makedirs does not skip f/..
        common.check_out_dir(f"{tmp_path}/f/../run")
    (tmp_path / "gone").symlink_to(tmp_path / "nowhere")
    with pytest.raises(common.UserError, match="is a broken link"):
        common.check_out_dir(tmp_path / "gone" / "run")
    with pytest.raises(common.UserError, match="empty"):
        common.check_out_dir("")
