"""gpu_check.sh's orchestration (a lent GPU gives ~15 minutes, so a wiring mistake there costs a whole session):
run in a copy of the scripts with a fake `python` that records every stage call and writes the files a stage
would, so the order, the flags and the failure lines are checked on CPU in seconds."""

import os
import shutil
import subprocess

from tests.conftest import REPO, fake_python, recorded_calls


def run_gpu_check(tmp_path, **env):
    work = tmp_path / "repo"
    work.mkdir(parents=True, exist_ok=True)  # a second call reuses the copy, and its runs/ (a warm machine)
    for f in ("gpu_check.sh", "reproduce.sh", "lib.sh", *(p.name for p in REPO.glob("*.py"))):  # (reproduce.sh's
        shutil.copy(REPO / f, work / f)                                                            # flag check)
    bin_ = tmp_path / "bin"
    fake_python(bin_)
    calls = tmp_path / "calls.log"
    calls.write_text("")  # this call's stage calls only
    out = tmp_path / "out"
    # gpu_check's own settings come from the test only, never from the environment the tests run in
    knobs = {"PARTS", "VARIANTS", "T5", "T6", "T7", "RNG", "SEED", "E1", "E2", "E3", "AUG", "FM_FLAGS", "STEPS", "EVAL", "RUN",
             "POOLING", "GRAPHS", "MAE", "NGPU", "FM_TORCH_LOGS", "KEEP", "E3_AUG", "VITB_FLAGS", "T1", "ARMS"}
    full = {k: v for k, v in os.environ.items() if k not in knobs}
    full.update({"PATH": f"{bin_}:{os.environ['PATH']}", "CALLS": str(calls), "OUT": str(out), "FAIL_SCRIPT": "none",
                 "NGPU": "1", **env})  # the device machine's one GPU (and no 2-s torch import to count it)
    r = subprocess.run(["bash", str(work / "gpu_check.sh")], capture_output=True, text=True, timeout=120, env=full)
    assert r.returncode == 0 and "gpu_check done" in r.stdout, r.stdout + r.stderr
    return [args for args, _ in recorded_calls(calls)], out, r.stdout  # each stage call parsed


def flag(call, name):
    """The value of the last `name` in the call: the one argparse keeps."""
    return call[len(call) - call[::-1].index(name)]


def test_fmsweep_runs_the_chain_and_a_variant_with_its_own_head(tmp_path):
    calls, out, _ = run_gpu_check(tmp_path, SEED="2", E2="3", FM_FLAGS="--compile 0 --num_workers 2",
                               VARIANTS="cls|--crop_min 0.5 --epochs 40|--views aug; b|--epochs 2")
    scripts = [c[0] for c in calls]
    # the chain: stage 1, its evaluation, stage 2, MAE-CT and MAE-CT_aug with their evaluations
    assert scripts.count("pretrain_mae.py") == 1 and scripts.count("contrastive_tune.py") == 4
    cls_head = next(c for c in calls if c[0] == "init_head.py" and flag(c, "--out_dir").endswith("head_cls"))
    # the recipe's stage 2 (its pooling, the CLS token, and E2) plus the variant's flags
    assert flag(cls_head, "--pooling") == "cls" and flag(cls_head, "--epochs") == "3" and flag(cls_head, "--views") == "aug"
    assert flag(cls_head, "--init_from") == "runs/fm_gpu/mae/ckpt.pt" and flag(cls_head, "--seed") == "2"
    cls_ct = next(c for c in calls if c[0] == "contrastive_tune.py" and flag(c, "--out_dir") == "runs/fm_gpu/cls")
    assert flag(cls_ct, "--init_from") == "runs/fm_gpu/head_cls/ckpt.pt"
    # the variant's own flags come after the recipe's, so they win (argparse keeps the last)
    assert cls_ct.index("--crop_min") > cls_ct.index("--topk") and flag(cls_ct, "--epochs") == "40"
    b_ct = next(c for c in calls if c[0] == "contrastive_tune.py" and flag(c, "--out_dir") == "runs/fm_gpu/b")
    assert flag(b_ct, "--init_from") == "runs/fm_gpu/head/ckpt.pt"  # no stage-2 flags: the chain's head
    assert calls.index(b_ct) > next(i for i, c in enumerate(calls) if c[0] == "init_head.py"
                                    and flag(c, "--out_dir") == "runs/fm_gpu/head")  # it waited for that head
    evals = [flag(c, "--out_dir") for c in calls if c[0] == "evaluate.py"]
    assert "runs/fm_gpu/eval_cls" in evals and "runs/fm_gpu/eval_b" in evals
    # FM_FLAGS reach every training run, and the evaluations only the flags evaluate.py takes
    assert all(flag(c, "--compile") == "0" for c in calls if c[0] != "evaluate.py")
    assert all("--compile" not in c and flag(c, "--num_workers") == "2" for c in calls if c[0] == "evaluate.py")
    assert (out / "fm.log").exists() and (out / "cls.log").exists()


def test_variants_without_the_chain_say_why_and_a_failed_stage_is_named(tmp_path):
    calls, out, stdout = run_gpu_check(tmp_path, PARTS="variants",
                                       VARIANTS="a|--epochs 3;b|--epochs 2|--pooling cls;head|--epochs 2")
    assert calls == []  # nothing to start from: no stage is run
    assert "'head' is a folder of the chain, skipped" in stdout
    assert "the chain's stage 2 did not finish" in (out / "a.log").read_text()
    assert "the chain's stage 1 did not finish" in (out / "b.log").read_text()

    calls, out, _ = run_gpu_check(tmp_path / "2", VARIANTS="bad|--epochs 2 --fail_here")
    assert "variants: bad: stage 3 failed or ran out of time" in (out / "bad.log").read_text()
    assert not any(c[0] == "evaluate.py" and flag(c, "--out_dir").endswith("eval_bad") for c in calls)


def test_a_variant_stops_waiting_when_the_chain_dies_before_its_input(tmp_path):
    # the chain's stage 2 fails, so runs/fm_gpu/head/DONE never appears: the variant must give up, not hang
    calls, out, _ = run_gpu_check(tmp_path, FAIL_SCRIPT="init_head.py", VARIANTS="a|--epochs 2")
    assert "variants: a: the chain's stage 2 did not finish" in (out / "a.log").read_text()
    assert not any(c[0] == "contrastive_tune.py" for c in calls)


def test_a_cls_chain_with_a_mean_arm_and_ctscript(tmp_path):
    # sessions 8-9's calls: POOLING reaches the chain's stage 2 (stage 3 takes the head's), the mean arm its own head
    calls, _, _ = run_gpu_check(tmp_path, SEED="1", POOLING="cls", VARIANTS="mean|--crop_min 0.5 --epochs 40|--pooling mean")
    heads = {flag(c, "--out_dir"): c for c in calls if c[0] == "init_head.py"}
    assert flag(heads["runs/fm_gpu/head"], "--pooling") == "cls" and flag(heads["runs/fm_gpu/head_mean"], "--pooling") == "mean"
    assert {flag(c, "--seed") for c in heads.values()} == {"1"}
    mean_ct = next(c for c in calls if c[0] == "contrastive_tune.py" and flag(c, "--out_dir") == "runs/fm_gpu/mean")
    assert flag(mean_ct, "--init_from") == "runs/fm_gpu/head_mean/ckpt.pt"
    # call 2 (issue 5): stage 3 itself in both compile modes from one short head, each evaluated
    calls, out, stdout = run_gpu_check(tmp_path / "2", PARTS="ctscript")
    assert "ctscript reduce-overhead: median None img/s over 0 windows, k-NN@10 1.0, 'skipping cudagraphs' lines 0" \
        in stdout  # the fake's one-line training log has no img/s
    cts = [c for c in calls if c[0] == "contrastive_tune.py"]
    assert [flag(c, "--compile_mode") for c in cts] == ["reduce-overhead", "default"]  # the unmeasured one first
    assert {flag(c, "--init_from") for c in cts} == {"runs/fm_cts/head/ckpt.pt"}
    assert [flag(c, "--init_from") for c in calls if c[0] == "evaluate.py"] == [
        "runs/fm_cts/ct_reduce-overhead/ckpt.pt", "runs/fm_cts/ct_default/ckpt.pt"]
    assert (out / "ctscript_reduce-overhead.log").exists()
    # a failed stage 1 or 2 is named and stops the part, not the script
    calls, _, stdout = run_gpu_check(tmp_path / "3", PARTS="ctscript", FAIL_SCRIPT="init_head.py")
    assert "ctscript: stages 1-2 failed" in stdout and not any(c[0] == "contrastive_tune.py" for c in calls)


def test_headscript_runs_stage_2_in_both_compile_modes_from_one_short_mae(tmp_path):
    calls, out, stdout = run_gpu_check(tmp_path, PARTS="headscript")
    heads = [c for c in calls if c[0] == "init_head.py"]
    assert [flag(c, "--compile_mode") for c in heads] == ["reduce-overhead", "default"]  # the unmeasured one first
    assert {flag(c, "--init_from") for c in heads} == {"runs/fm_cts/mae/ckpt.pt"}
    assert not any(c[0] in ("contrastive_tune.py", "evaluate.py") for c in calls)
    assert "headscript reduce-overhead: median None img/s over 0 windows, final loss 1.0, nn_acc 0.5" \
        in stdout  # the fake's one log line
    assert (out / "headscript_default.log").exists()
    calls, _, stdout = run_gpu_check(tmp_path / "2", PARTS="headscript", FAIL_SCRIPT="pretrain_mae.py")
    assert "headscript: stages 1-2 failed" in stdout and not any(c[0] == "init_head.py" for c in calls)


def test_the_next_sessions_calls_a_seed_4_chain_then_80_tuning_epochs_beside_its_end(tmp_path):
    # call 1 of the header: the chain, its two arms side by side; suppose its deadline cut MAE-CT_aug's evaluation
    calls, _, _ = run_gpu_check(tmp_path, SEED="4", ARMS="parallel")
    assert {flag(c, "--seed") for c in calls} == {"4"}
    assert {flag(c, "--data_path") for c in calls} == {".devdata/fm"}  # the evaluations' too (lib.sh)
    assert (tmp_path / "out" / "fm_arm_aug.log").exists() and "this call took" in (tmp_path / "out" / "fm.log").read_text()
    (tmp_path / "repo" / "runs" / "fm_gpu" / "eval_ct_aug" / "results.json").unlink()
    # call 2: the chain finished (that evaluation only) and the 80-epoch stage 3 from the chain's head, evaluated
    calls, out, _ = run_gpu_check(tmp_path, SEED="4", KEEP="1", ARMS="parallel", T5="190", FM_TORCH_LOGS="",
                                  VARIANTS="e80|--crop_min 0.5 --epochs 80 --compile_mode reduce-overhead")
    trained = [(c[0], flag(c, "--out_dir")) for c in calls if c[0] != "evaluate.py"]
    assert trained == [("contrastive_tune.py", "runs/fm_gpu/e80")]
    e80 = next(c for c in calls if c[0] == "contrastive_tune.py")
    assert flag(e80, "--init_from") == "runs/fm_gpu/head/ckpt.pt" and flag(e80, "--epochs") == "80"
    assert flag(e80, "--crop_min") == "0.5" and flag(e80, "--topk") == "20" and flag(e80, "--seed") == "4"
    evals = sorted(flag(c, "--out_dir") for c in calls if c[0] == "evaluate.py")
    assert evals == ["runs/fm_gpu/eval_ct_aug", "runs/fm_gpu/eval_e80"]
    assert (out / "e80.log").exists()


def test_keep_continues_a_cut_off_chain_and_a_plain_call_starts_afresh(tmp_path):
    run_gpu_check(tmp_path)
    done = run_gpu_check(tmp_path, KEEP="1")[0]  # every stage and evaluation is there: nothing runs again
    assert done == []
    (tmp_path / "repo" / "runs" / "fm_gpu" / "ct_aug" / "DONE").unlink()  # as if the deadline cut MAE-CT_aug
    again = run_gpu_check(tmp_path, KEEP="1")[0]
    # that stage runs again, and so does its evaluation, which was of the earlier training (reproduce.sh's lib.sh)
    assert [(c[0], flag(c, "--out_dir")) for c in again] == [("contrastive_tune.py", "runs/fm_gpu/ct_aug"),
                                                              ("evaluate.py", "runs/fm_gpu/eval_ct_aug")]
    fresh = run_gpu_check(tmp_path)[0]  # without KEEP the chain starts over
    assert [c[0] for c in fresh].count("pretrain_mae.py") == 1


def test_vitb_passes_its_extra_flags_to_the_benchmark(tmp_path):
    calls, _, _ = run_gpu_check(tmp_path, PARTS="vitb", VITB_FLAGS="--compile_mode max-autotune-no-cudagraphs")
    assert [c[0] for c in calls] == ["bench.py"]
    assert flag(calls[0], "--model") == "vit_base" and flag(calls[0], "--compile_mode") == "max-autotune-no-cudagraphs"


def test_help_and_a_machine_without_gpu(tmp_path):
    """--help prints the header and starts nothing; on a machine where torch sees no GPU it stops at once (it once
    started the Fashion-MNIST chain on a CPU, until its 580-s limit, for a newcomer who asked for --help)."""
    work, bin_ = tmp_path / "repo", tmp_path / "bin"
    work.mkdir()
    shutil.copy(REPO / "gpu_check.sh", work / "gpu_check.sh")
    fake_python(bin_)
    env = {"PATH": f"{bin_}:{os.environ['PATH']}", "CALLS": str(tmp_path / "calls.log"), "OUT": str(tmp_path / "out")}
    r = subprocess.run(["bash", str(work / "gpu_check.sh"), "--help"], capture_output=True, text=True, timeout=30, env=env)
    assert r.returncode == 0 and r.stdout.startswith("The GPU check in one go") and "PARTS" in r.stdout
    r = subprocess.run(["bash", str(work / "gpu_check.sh")], capture_output=True, text=True, timeout=30,
                       env={**env, "NGPU": "0"})
    assert r.returncode == 2 and r.stderr.startswith("error: gpu_check.sh is for a machine with a GPU"), r.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "calls.log").exists()
