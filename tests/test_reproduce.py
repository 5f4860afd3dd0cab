"""reproduce.sh: each recipe's stage commands (a fake python records them), a real run of stages 2-3 from a given
MAE, and refusals. The whole smoke chain runs for real, with a rerun that skips every finished stage, in
tests/test_ablations.py (ablations.sh runs it first): one real chain for both scripts keeps the suite short."""
import glob
import json
import os
import shutil
import subprocess
import time

import pytest

from tests.conftest import REPO, fake_python, load_ckpt, recorded_calls


def test_reproduce_rejects_unknown_recipe_and_pooling(tmp_path):
    r = subprocess.run(["bash", str(REPO / "reproduce.sh"), "nope"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stderr.startswith("error: unknown recipe")
    # a bad POOLING stops before stage 1, not after it (init_head.py would refuse it only then)
    r = subprocess.run(["bash", str(REPO / "reproduce.sh"), "smoke", "--device", "cpu"], cwd=REPO, capture_output=True,
                       text=True, timeout=60, env=dict(os.environ, POOLING="CLS", RUN=str(tmp_path / "run")))
    assert r.returncode == 2 and r.stderr.startswith("error: POOLING='CLS'") and not (tmp_path / "run").exists()
    r = subprocess.run(["bash", str(REPO / "reproduce.sh"), "smoke", "--device", "cpu"], cwd=REPO, capture_output=True,
                       text=True, timeout=60, env=dict(os.environ, GRAPHS="0", RUN=str(tmp_path / "run")))
    assert r.returncode == 2 and r.stderr.startswith("error: GRAPHS='0'") and not (tmp_path / "run").exists()
    r = subprocess.run(["bash", str(REPO / "reproduce.sh"), "smoke", "--device", "cpu"], cwd=REPO, capture_output=True,
                       text=True, timeout=60, env=dict(os.environ, MAE=str(tmp_path / "nope.pth"), RUN=str(tmp_path / "run")))
    assert r.returncode == 2 and r.stderr.startswith("error: MAE=") and not (tmp_path / "run").exists()
    r = subprocess.run(["bash", str(REPO / "reproduce.sh"), "smoke", "--device"], cwd=REPO, capture_output=True,
                       text=True, timeout=60, env=dict(os.environ, RUN=str(tmp_path / "run")))
    assert r.returncode == 2 and r.stderr == "error: --device needs a value\n" and not (tmp_path / "run").exists()
    r = subprocess.run(["bash", str(REPO / "reproduce.sh"), "smoke", "--device", "cpu"], cwd=REPO, capture_output=True,
                       text=True, timeout=60, env=dict(os.environ, HEADS="2", RUN=str(tmp_path / "run")))
    assert r.returncode == 2 and r.stderr.startswith("error: HEADS= is for MAE=") and not (tmp_path / "run").exists()


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
@pytest.mark.chain
def test_reproduce_from_official_mae_weights(tmp_path):
    """MAE=FILE: stages 2-3 start from an official-format MAE file (encoder weights only); stage 1 is not run."""
    import torch
    import model
    cfg = model.model_config("vit_nano", 32, 4, 3)
    mae = model.init_weights(model.MaskedAutoencoder(**cfg))
    official = tmp_path / "mae_pretrain_vit_nano.pth"
    torch.save({"model": model.encoder_state_dict(mae.state_dict())}, official)  # as facebookresearch/mae ships it
    run = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k not in {"POOLING", "SEED", "E1", "E2", "E3", "E3_AUG"}}
    env.update(MAE=str(official), RUN=str(run), STEPS="2", AUG="0", OMP_NUM_THREADS="1", EVAL="--metrics knn")
    r = subprocess.run(["bash", str(REPO / "reproduce.sh"), "smoke", "--device", "cpu"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert not (run / "mae").exists() and "pretrain_mae.py" not in r.stdout and not (run / "ct_aug").exists()
    assert load_ckpt(run / "head" / "ckpt.pt")["args"]["init_from"] == str(official)
    mae = json.loads((run / "eval_mae" / "results.json").read_text())
    assert mae["checkpoint"] == str(official) and {"cls", "mean"} <= mae.keys()
    # the smoke recipe tunes the CLS token (session 11): the table leads with the MAE's CLS token and shows its mean
    # of patch tokens too, each with its own numbers (POOLING=mean, the other way round: tests/test_ablations.py)
    assert [load_ckpt(run / s / "ckpt.pt")["args"]["pooling"] for s in ("head", "ct")] == ["cls", "cls"]
    rows = (run / "table.md").read_text().splitlines()
    row = lambda name: next(line for line in rows if line.startswith(f"| {name} |")).split("|")[2].strip()
    assert rows[0].startswith(f"{run}: stages 2-3 tuned the MAE's CLS token") and rows[4].startswith("| MAE (CLS token) |")
    assert row("MAE (CLS token)") == f"{mae['cls']['knn10']:.1f}" and row("MAE (mean pooling)") == f"{mae['mean']['knn10']:.1f}"
    assert row("MAE-CT") == f"{json.loads((run / 'eval_ct' / 'results.json').read_text())['knn10']:.1f}"
    assert "| MAE (CLS token) |" in r.stdout and "| MAE-CT |" in r.stdout
    assert load_ckpt(run / "ct" / "ckpt.pt")["config"]["num_heads"] == 4  # the preset's: the file records none
    # HEADS=: a file trained with another head count; every stage and evaluation after it has that count
    env2 = dict(env, RUN=str(tmp_path / "run2"), HEADS="2")
    r = subprocess.run(["bash", str(REPO / "reproduce.sh"), "smoke", "--device", "cpu"], cwd=REPO, env=env2,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert [load_ckpt(tmp_path / "run2" / s / "ckpt.pt")["config"]["num_heads"] for s in ("head", "ct")] == [2, 2]
    # a rerun that forgets MAE= stops before training a stage 1 that stages 2-3 would not use
    env.pop("MAE")
    r = subprocess.run(["bash", str(REPO / "reproduce.sh"), "smoke", "--device", "cpu"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "has its stage 1 from" in r.stderr and not (run / "mae").exists()


def fake_reproduce(tmp_path, recipe, ngpu, flags=("--data_path", "d"), **env):
    """reproduce.sh `recipe` in a copy, with a fake python and torchrun that see `ngpu` GPUs and record each stage
    command in tmp_path/calls.log (a second call reuses the copy and its run folder, tmp_path/run)."""
    work, bin_ = tmp_path / "repo", tmp_path / "bin"
    work.mkdir(parents=True, exist_ok=True)
    for f in ("reproduce.sh", "lib.sh", *(p.name for p in REPO.glob("*.py"))):  # its flag check imports the stages
        shutil.copy(REPO / f, work / f)
    fake_python(bin_)
    calls = tmp_path / "calls.log"
    calls.write_text("")
    full = {"PATH": f"{bin_}:{os.environ['PATH']}", "HOME": os.environ.get("HOME", str(tmp_path)), "CALLS": str(calls),
            "NGPU": str(ngpu), "RUN": str(tmp_path / "run"), **env}  # nothing else from the caller's environment
    return subprocess.run(["bash", str(work / "reproduce.sh"), recipe, *flags], capture_output=True,
                          text=True, timeout=60, env=full), calls


def recipe_calls(tmp_path, recipe, ngpu, **env):
    """The stage commands reproduce.sh gives `recipe` with `ngpu` visible GPUs (recorded by the fake python and
    torchrun, each parsed with the script's real argparse), as {script: [(args, launched by torchrun)]}."""
    r, calls = fake_reproduce(tmp_path, recipe, ngpu, env.pop("flags", ("--data_path", "d")), **env)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    out = {}
    for args, torchrun in recorded_calls(calls):
        out.setdefault(args[0], []).append((args, torchrun))
    return out


def value(args, name):
    return args[args.index(name) + 1] if name in args else None


# recipe: (CUDA graphs in stages 1 and 3 on one GPU, the pooling stages 2-3 are told to tune; None: the model size's)
RECIPES = {"smoke": (False, "cls"), "cifar10_5k": (False, None), "fashion_mnist": (True, "cls"), "cifar10": (True, None),
           "cifar100": (True, None), "imagenet100": (False, None), "imagenet": (False, None)}


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
@pytest.mark.parametrize("recipe", RECIPES)
def test_recipes_use_cuda_graphs_on_one_gpu_only_and_their_pooling(tmp_path, recipe):
    graphs, pooling = RECIPES[recipe]
    for ngpu in (0, 1, 2):
        calls = recipe_calls(tmp_path / str(ngpu), recipe, ngpu, AUG="1")  # smoke runs MAE-CT_aug only when asked
        (mae, _), = calls["pretrain_mae.py"]
        heads = [a for a, _ in calls["init_head.py"]]
        cts = [a for a, _ in calls["contrastive_tune.py"]]
        # MAE-CT, and MAE-CT_aug from its own head trained on the colour views (stage 3 takes the views from it)
        assert [value(h, "--views") for h in heads] == [None, "aug"] and len(cts) == 2
        assert [value(c, "--init_from").split("/")[-2] for c in cts] == ["head", "head_aug"]
        assert value(cts[1], "--views") is None and value(cts[1], "--head_blr") is None  # the _aug defaults
        # both arms get the recipe's epochs and top-k; the ImageNet recipes' MAE-CT_aug the paper's (80, top-10)
        paper_aug = recipe.startswith("imagenet")
        assert [value(c, "--epochs") for c in cts] == (["20", "80"] if paper_aug else [value(cts[0], "--epochs")] * 2)
        assert [value(c, "--topk") for c in cts] == ([None] * 2 if paper_aug else [value(cts[0], "--topk")] * 2)
        # cifar10_5k's MAE-CT_aug tunes at 10x the paper's lr (RESULTS.md, session 21); every other stage 3 at the paper's
        assert [value(c, "--blr") for c in cts] == [None, "1e-3" if recipe == "cifar10_5k" else None]
        want = "reduce-overhead" if graphs and ngpu == 1 else None  # torchrun: never (contrastive_tune.py refuses it)
        assert [value(a, "--compile_mode") for a in [mae] + cts] == [want] * 3
        assert [value(h, "--pooling") for h in heads] == [pooling] * 2
        assert all(t == (ngpu > 1) for c in calls.values() for _, t in c)
    if graphs:  # GRAPHS=mae: stage 1 only (the recipes before session 9), none: nowhere; POOLING overrides the recipe
        for knob, stage1 in (("mae", "reduce-overhead"), ("none", None)):
            calls = recipe_calls(tmp_path / knob, recipe, 1, GRAPHS=knob, POOLING="mean", AUG="0")
            (mae, _), = calls["pretrain_mae.py"]
            (ct, _), = calls["contrastive_tune.py"]
            assert value(mae, "--compile_mode") == stage1 and value(ct, "--compile_mode") is None
            (head, _), = calls["init_head.py"]
            assert value(head, "--pooling") == "mean"
    # the recipe's own variables are not taken from the environment
    calls = recipe_calls(tmp_path / "env", recipe, 2, AUG="1", ct_extra="--compile_mode reduce-overhead", pool="cls",
                         graphs="1", mae_extra="--compile_mode reduce-overhead", extra_ct_aug="--blr 5")
    assert all(value(a, "--compile_mode") is None for c in calls.values() for a, _ in c)
    assert [value(a, "--blr") for a, _ in calls["contrastive_tune.py"]] == [value(c, "--blr") for c in cts]
    assert [value(h, "--pooling") for h, _ in calls["init_head.py"]] == [pooling] * 2


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_a_gpu_recipe_without_a_gpu_says_so_and_help_and_no_recipe(tmp_path):
    for recipe, ngpu, noted in [("fashion_mnist", 0, True), ("fashion_mnist", 1, False), ("smoke", 0, False)]:
        r, _ = fake_reproduce(tmp_path / f"{recipe}{ngpu}", recipe, ngpu)
        assert r.returncode == 0 and ("note: no GPU in use" in r.stderr) == noted, r.stderr[-2000:]
    for script, first in [("reproduce.sh", "MAE-CT end to end"), ("ablations.sh", "The paper's three checks")]:
        r = subprocess.run(["bash", os.path.relpath(REPO / script, tmp_path), "--help"], cwd=tmp_path,  # from elsewhere
                           capture_output=True, text=True, timeout=30)
        assert r.returncode == 0 and r.stdout.startswith(first) and "SEED" in r.stdout, r.stderr
    r = subprocess.run(["bash", str(REPO / "reproduce.sh")], capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and r.stderr.startswith("usage: bash reproduce.sh smoke|")


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
@pytest.mark.parametrize("device", [["--device", "cpu"], ["--device=cpu"]])
def test_device_cpu_runs_every_stage_as_one_cpu_process_beside_gpus(tmp_path, device):
    """With GPUs visible, --device cpu still runs each stage as one CPU process (torchrun over the GPU count would
    start that many CPU processes), and ARMS=parallel, which is for one GPU or CPU, is allowed."""
    calls = recipe_calls(tmp_path, "fashion_mnist", 2, flags=("--data_path", "d", *device), ARMS="parallel")
    stages = [c for cs in calls.values() for c in cs]
    assert len(stages) == 8 and not any(t for _, t in stages)  # 5 stages and 3 evaluations, none through torchrun
    assert all(" ".join(device) in " ".join(a) for a, _ in stages)
    # the last --device decides, as in argparse
    r, calls_file = fake_reproduce(tmp_path / "last", "fashion_mnist", 2, ("--device", "cpu", "--device", "cuda"))
    assert r.returncode == 0 and all(t for _, t in recorded_calls(calls_file)), r.stderr[-2000:]
    # one GPU named among several: one process on it, not torchrun over all of them (setup would override the choice)
    r, calls_file = fake_reproduce(tmp_path / "one", "fashion_mnist", 2, ("--device", "cuda:1"), AUG="0")
    stages = recorded_calls(calls_file)
    assert r.returncode == 0 and stages and not any(t for _, t in stages), r.stderr[-2000:]
    assert all(value(a, "--device") == "cuda:1" for a, _ in stages)


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_smoke_runs_mae_ct_only_unless_aug_is_1(tmp_path):
    """smoke leaves MAE-CT_aug out by default (its chain then fits 10 minutes on 2 slow cores); AUG=1 adds it, AUG=0
    takes it out of any recipe, and another value stops before anything runs."""
    cases = [("smoke", {}, ["head", "ct"]), ("smoke", {"AUG": "1"}, ["head", "ct", "head_aug", "ct_aug"]),
             ("cifar10_5k", {}, ["head", "ct", "head_aug", "ct_aug"]), ("cifar10_5k", {"AUG": "0"}, ["head", "ct"])]
    for i, (recipe, env, stages) in enumerate(cases):
        r, calls = fake_reproduce(tmp_path / str(i), recipe, 0, **env)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
        done = [value(a, "--out_dir").split("/")[-1] for a, _ in recorded_calls(calls)]
        assert [d for d in done if not d.startswith("eval_")] == ["mae", *stages]
        assert ("| MAE-CT_aug |" in r.stdout) == ("ct_aug" in stages)
    r, calls = fake_reproduce(tmp_path / "bad", "smoke", 0, AUG="yes")
    assert r.returncode == 2 and r.stderr == "error: AUG='yes' (0 or 1)\n" and recorded_calls(calls) == []
    assert not (tmp_path / "bad" / "run").exists()


# recipe: stage epochs E1, E2, E3 (E3 of MAE-CT_aug), queue, stage 3's top-k and crop_min (None: the script's default),
# as README.md and RESULTS.md give them; warm-ups are derived: E1/20 + 1, E2/5, E3/5
RECIPE_VALUES = {
    "smoke": (30, 10, 10, 10, 2048, "5", None), "cifar10_5k": (100, 20, 100, 100, 1024, "5", None),
    "fashion_mnist": (100, 20, 40, 40, 16384, "20", "0.5"), "cifar10": (800, 20, 20, 20, 16384, "20", None),
    "cifar100": (800, 20, 20, 20, 16384, "20", None), "imagenet100": (800, 20, 20, 80, 65536, None, None),
    "imagenet": (800, 20, 20, 80, 65536, None, None)}


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
@pytest.mark.parametrize("recipe", RECIPE_VALUES)
def test_recipe_epochs_warmups_queue_and_lookup(tmp_path, recipe):
    """Each recipe's stage budgets and lookup, so that a changed recipe is a deliberate change (its RESULTS.md
    numbers were measured with these); the other tests only check that both arms agree with each other."""
    e1, e2, e3, e3aug, queue, topk, crop = RECIPE_VALUES[recipe]
    calls = recipe_calls(tmp_path, recipe, 1, AUG="1")
    (mae, _), = calls["pretrain_mae.py"]
    assert (value(mae, "--epochs"), value(mae, "--warmup_epochs")) == (str(e1), str(e1 // 20 + 1))
    arm = lambda script, name: next(a for a, _ in calls[script] if value(a, "--out_dir").endswith("/" + name))
    for head, ct, epochs in [(arm("init_head.py", "head"), arm("contrastive_tune.py", "ct"), e3),
                             (arm("init_head.py", "head_aug"), arm("contrastive_tune.py", "ct_aug"), e3aug)]:
        assert (value(head, "--epochs"), value(head, "--warmup_epochs")) == (str(e2), str(e2 // 5))
        assert (value(ct, "--epochs"), value(ct, "--warmup_epochs")) == (str(epochs), str(epochs // 5))
        assert value(head, "--queue_size") == value(ct, "--queue_size") == str(queue)
        assert (value(ct, "--topk"), value(ct, "--crop_min")) == (topk, crop)


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_an_interrupted_stage_resumes_and_the_table_puts_each_number_in_its_column(tmp_path):
    """A stage killed before it finished (its checkpoint there, no DONE) is continued with --resume, and nothing
    else runs again; the final table takes each column from its own key (k-means: the mean over restarts) and
    lists the tuned pooling's MAE first."""
    run = tmp_path / "run"
    assert fake_reproduce(tmp_path, "smoke", 0, AUG="0")[0].returncode == 0
    (run / "ct" / "DONE").unlink()
    r, calls = fake_reproduce(tmp_path, "smoke", 0, AUG="0")
    assert r.returncode == 0, r.stderr[-2000:]
    assert [(a[0], value(a, "--out_dir"), "--resume" in a) for a, _ in recorded_calls(calls)] == [
        ("contrastive_tune.py", f"{run}/ct", True), ("evaluate.py", f"{run}/eval_ct", False)]
    keys = ["knn10", "knn20", "linear", "kmeans_acc_mean", "nmi", "ari"]
    res = lambda first, pooling: dict({k: first + i for i, k in enumerate(keys)}, kmeans_acc_best=99.0, pooling=pooling)
    (run / "eval_mae" / "results.json").write_text(json.dumps({"cls": res(10, "cls"), "mean": res(20, "mean")}))
    (run / "eval_ct" / "results.json").write_text(json.dumps(res(30, "mean")))
    (run / "eval_ct_aug").mkdir()  # left by an earlier call with AUG=1, maybe from another stage 1: not in this table
    (run / "eval_ct_aug" / "results.json").write_text(json.dumps(res(40, "mean")))
    r, calls = fake_reproduce(tmp_path, "smoke", 0, AUG="0")  # everything skipped: the table again
    assert r.returncode == 0 and recorded_calls(calls) == [], r.stderr[-2000:]
    assert [line for line in (run / "table.md").read_text().splitlines() if line.startswith("| MAE")] == [
        "| MAE (mean pooling) | 20.0 | 21.0 | 22.0 | 23.0 | 24.0 | 25.0 |",  # the one stage 3 tuned, first
        "| MAE (CLS token) | 10.0 | 11.0 | 12.0 | 13.0 | 14.0 | 15.0 |",
        "| MAE-CT | 30.0 | 31.0 | 32.0 | 33.0 | 34.0 | 35.0 |"]


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_a_stage_that_failed_before_saving_starts_again_with_the_corrected_settings(tmp_path):
    """A first attempt that failed before stage 1 saved anything (a mistyped flag, data not found) leaves no
    settings to keep: the corrected command runs. Once the stage has a checkpoint, other settings are refused."""
    r, _ = fake_reproduce(tmp_path, "smoke", 0, flags=("--data_path", "typo"), AUG="0", FAIL_OUT="mae")
    assert r.returncode != 0 and not (tmp_path / "run" / "mae" / "ckpt.pt").exists()
    assert f"error: pretrain_mae.py stopped (exit 1) in {tmp_path}/run/mae; it saved nothing: correct the command" in r.stderr
    r, calls = fake_reproduce(tmp_path, "smoke", 0, flags=("--data_path", "d"), AUG="0")
    assert r.returncode == 0, r.stderr[-2000:]
    assert value(recorded_calls(calls)[0][0], "--data_path") == "d"
    (tmp_path / "run" / "ct" / "DONE").unlink()  # stage 3 interrupted after a checkpoint, then failing on the rerun
    r, _ = fake_reproduce(tmp_path, "smoke", 0, flags=("--data_path", "d"), AUG="0", FAIL_OUT="ct")
    assert r.returncode != 0 and "run/ct; the same command continues from its last checkpoint" in r.stderr
    r, _ = fake_reproduce(tmp_path, "smoke", 0, flags=("--data_path", "d"), AUG="0")
    assert r.returncode == 0, r.stderr[-2000:]
    r, calls = fake_reproduce(tmp_path, "smoke", 0, flags=("--data_path", "d2"), AUG="0")
    assert r.returncode == 2 and "was made with other settings" in r.stderr and recorded_calls(calls) == []
    # stage 2 failed before saving, then stage 1 was trained again: stage 2 has nothing made from the old one, so it runs
    run = tmp_path / "run"
    shutil.rmtree(run / "head"), shutil.rmtree(run / "ct")
    assert fake_reproduce(tmp_path, "smoke", 0, AUG="0", FAIL_OUT="head")[0].returncode != 0
    assert (run / "head" / "FROM").exists() and not (run / "head" / "ckpt.pt").exists()
    shutil.rmtree(run / "mae")
    r, calls = fake_reproduce(tmp_path, "smoke", 0, AUG="0")
    assert r.returncode == 0, r.stderr[-2000:]
    assert [a[0] for a, _ in recorded_calls(calls)][:3] == ["pretrain_mae.py", "evaluate.py", "init_head.py"]


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_a_run_folder_that_is_a_file_is_refused_before_anything_runs(tmp_path):
    (tmp_path / "afile").write_text("")
    for run in (tmp_path / "afile", tmp_path / "afile" / "run"):
        r, calls = fake_reproduce(tmp_path, "smoke", 0, RUN=str(run))
        assert r.returncode == 2 and recorded_calls(calls) == [], r.stderr[-2000:]
        assert [line for line in r.stderr.splitlines() if line.strip()] == [
            f"error: RUN={run} is a file, not a folder" if run.name == "afile" else
            f"error: RUN={run} cannot be made (a file on its path, or no permission)"]


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_an_extra_flag_a_stage_does_not_take_stops_the_chain_before_stage_1(tmp_path):
    """Extra flags go to every training stage, so one that only stage 1 takes would fail in stage 2, after all of
    stage 1 (hours on a GPU recipe): each stage's real parser is asked first. A flag they all take goes to each."""
    r, calls = fake_reproduce(tmp_path / "bad", "smoke", 0, flags=("--device", "cpu", "--mask_ratio", "0.6"), AUG="0")
    assert r.returncode == 2 and recorded_calls(calls) == [], r.stderr[-2000:]
    assert [line for line in r.stderr.splitlines() if "error" in line] == [
        "error: init_head.py: unrecognized arguments: --mask_ratio 0.6 (see --help); reproduce.sh gives its extra "
        "flags to every training stage"]
    r, calls = fake_reproduce(tmp_path / "s1", "smoke", 0, flags=("--device", "cpu", "--crop_min", "0.3"), AUG="0")
    assert r.returncode == 2 and "pretrain_mae.py: unrecognized arguments: --crop_min 0.3" in r.stderr
    (tmp_path / "given" / "repo").mkdir(parents=True)
    (tmp_path / "given" / "repo" / "official.pth").write_bytes(b"")  # stage 1 from a file: stages 2-3 both take it
    r, calls = fake_reproduce(tmp_path / "given", "smoke", 0, flags=("--device", "cpu", "--crop_min", "0.3"), AUG="0",
                              MAE="official.pth")
    assert r.returncode == 0, r.stderr[-2000:]
    stages = [a for a, _ in recorded_calls(calls) if a[0] != "evaluate.py"]
    assert [a[0] for a in stages] == ["init_head.py", "contrastive_tune.py"]
    assert all(value(a, "--crop_min") == "0.3" for a in stages)


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_a_copied_stage_1_is_reused_in_a_new_run_folder(tmp_path):
    """A stage 1 and its evaluation copied into a new RUN (as RESULTS.md's runs tune one MAE two ways) are skipped
    there: only stages 2-3 and their evaluation run, here with the other pooling."""
    r, _ = fake_reproduce(tmp_path, "smoke", 0, AUG="0")
    assert r.returncode == 0, r.stderr[-2000:]
    new = tmp_path / "new"
    for d in ("mae", "eval_mae"):
        shutil.copytree(tmp_path / "run" / d, new / d)
    r, calls = fake_reproduce(tmp_path, "smoke", 0, RUN=str(new), POOLING="mean", AUG="0")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    scripts = [args[0] for args, _ in recorded_calls(calls)]
    assert scripts == ["init_head.py", "contrastive_tune.py", "evaluate.py"] and "pretrain_mae.py ->" not in r.stdout
    head = next(args for args, _ in recorded_calls(calls) if args[0] == "init_head.py")
    assert value(head, "--pooling") == "mean" and value(head, "--init_from") == f"{new}/mae/ckpt.pt"


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_what_was_made_from_a_stage_trained_again_is_not_reused(tmp_path):
    """A stage deleted after a change of settings and trained again: a later stage made from its earlier training
    stops the rerun (not skipped, not resumed), and an evaluation of it is redone."""
    run = tmp_path / "run"
    r, _ = fake_reproduce(tmp_path, "smoke", 0, AUG="0")
    assert r.returncode == 0, r.stderr[-2000:]
    assert (run / "ct" / "FROM").read_text() == (run / "head" / "ID").read_text() != (run / "mae" / "ID").read_text()
    r, _ = fake_reproduce(tmp_path, "smoke", 0, AUG="0", E2="3")  # another stage 2: refused, as before
    assert r.returncode == 2 and "delete it and the stages after it" in r.stderr
    shutil.rmtree(run / "head")  # deleted, as the error says, but not the stages after it
    r, calls = fake_reproduce(tmp_path, "smoke", 0, AUG="0", E2="3")
    assert r.returncode == 2 and [a[0] for a, _ in recorded_calls(calls)] == ["init_head.py"]
    assert r.stderr.strip() == f"error: {run / 'ct'} was made from an earlier {run / 'head'}, trained again since; " \
                               f"delete {run / 'ct'} and the stages after it, or use another RUN="
    shutil.rmtree(run / "ct")
    r, calls = fake_reproduce(tmp_path, "smoke", 0, AUG="0", E2="3")
    assert r.returncode == 0, r.stderr[-2000:]
    assert [(a[0], value(a, "--out_dir")) for a, _ in recorded_calls(calls)] == [
        ("contrastive_tune.py", f"{run}/ct"), ("evaluate.py", f"{run}/eval_ct")]  # eval_mae is still current
    assert f"{run}/ct/ckpt.pt was trained again since; evaluating it again" in r.stdout
    # a folder made before session 19 has no ID or FROM files: once its head is trained again, its ct is stale too
    old = tmp_path / "old"
    assert fake_reproduce(tmp_path, "smoke", 0, AUG="0", RUN=str(old))[0].returncode == 0
    for f in [*old.glob("*/ID"), *old.glob("*/FROM")]:
        f.unlink()
    assert fake_reproduce(tmp_path, "smoke", 0, AUG="0", RUN=str(old))[0].returncode == 0  # without IDs: all current
    shutil.rmtree(old / "head")
    r, _ = fake_reproduce(tmp_path, "smoke", 0, AUG="0", RUN=str(old))
    assert r.returncode == 2 and f"error: {old / 'ct'} was made from an earlier {old / 'head'}, trained again" in r.stderr
    shutil.rmtree(old / "ct")  # and its old evaluation, also without FROM, is not taken for the new ct's
    r, calls = fake_reproduce(tmp_path, "smoke", 0, AUG="0", RUN=str(old))
    assert r.returncode == 0 and f"{old}/ct/ckpt.pt was trained again since; evaluating it again" in r.stdout
    assert [value(a, "--out_dir") for a, _ in recorded_calls(calls)] == [f"{old}/ct", f"{old}/eval_ct"]


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_a_head_from_before_session_10_is_not_continued(tmp_path):
    """Session 10 changed stages 2-3 in code (AdamW beta2, the head's init), not in their flags: a run folder made
    before keeps its stage 1, but its stage-2 head is neither reused nor continued."""
    r, _ = fake_reproduce(tmp_path, "cifar10_5k", 0)  # real data: only the session-10 tag (smoke has two)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    head = tmp_path / "run" / "head"
    tagged = (head / "SETTINGS").read_text()
    assert tagged.startswith("[stages 2-3 of session 10] init_head.py ")
    (head / "SETTINGS").write_text(tagged.split("] ", 1)[1])  # as reproduce.sh wrote it before session 10
    r, calls = fake_reproduce(tmp_path, "cifar10_5k", 0)
    assert r.returncode == 2 and r.stderr.startswith(f"error: {head} was made before session 10's stage-2/3 settings")
    assert "/mae: done already, skipped" in r.stdout  # stage 1 did not change: kept
    assert recorded_calls(calls) == []  # nothing trained or evaluated


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_a_smoke_run_on_the_untiled_shapes_is_not_continued(tmp_path):
    """Session 11 tiled the generated shapes (data.make_synthetic), a change in code, not in flags: a smoke run
    folder made before has a stage 1 trained on other images, and none of its stages is reused."""
    r, _ = fake_reproduce(tmp_path, "smoke", 0, AUG="1")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    run = tmp_path / "run"
    for stage in ("mae", "head", "ct", "head_aug", "ct_aug"):
        assert (run / stage / "SETTINGS").read_text().startswith("[tiled shapes of session 11] ")
    old = (run / "mae" / "SETTINGS").read_text().replace("[tiled shapes of session 11] ", "")
    (run / "mae" / "SETTINGS").write_text(old)  # as reproduce.sh wrote it before session 11
    r, calls = fake_reproduce(tmp_path, "smoke", 0)
    assert r.returncode == 2
    assert r.stderr.strip() == f"error: {run / 'mae'} has no tag of session 11's tiled generated shapes, so it may " \
                               "have seen the untiled ones; use another RUN= (and no stage 1 from such a folder as MAE=)"
    assert recorded_calls(calls) == []  # nothing trained or evaluated
    r, _ = fake_reproduce(tmp_path, "cifar10_5k", 0, RUN=str(tmp_path / "c5k"))  # real data: no tag
    assert r.returncode == 0 and not (tmp_path / "c5k" / "mae" / "SETTINGS").read_text().startswith("[")


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_parallel_arms_run_the_same_stages_and_a_failed_arm_stops_the_chain(tmp_path):
    """ARMS=parallel: MAE-CT_aug's arm runs beside MAE-CT's (both need only stage 1), with the same stage commands as
    serial; a failure in either arm stops the chain with an error and no table, and the other arm is stopped too."""
    serial = recipe_calls(tmp_path / "serial", "fashion_mnist", 1)
    par = recipe_calls(tmp_path / "par", "fashion_mnist", 1, ARMS="parallel")
    key = lambda calls: sorted(" ".join(a) for c in calls.values() for a, _ in c)
    assert key(par) == [k.replace("/serial/", "/par/") for k in key(serial)]
    run = tmp_path / "par" / "run"
    assert "== init_head.py -> " + str(run / "head_aug") in (run / "arm_aug.log").read_text()
    assert (run / "table.md").read_text().count("| MAE-CT_aug |") == 1
    # the aug arm fails: the MAE-CT arm finishes, the chain stops with the arm's log, no table
    r, _ = fake_reproduce(tmp_path / "fail_aug", "fashion_mnist", 1, ARMS="parallel", FAIL_OUT="ct_aug")
    run = tmp_path / "fail_aug" / "run"
    assert r.returncode == 1 and "error: MAE-CT_aug's arm failed" in r.stderr and "ct_aug" in r.stderr
    assert (run / "eval_ct" / "results.json").exists() and not (run / "table.md").exists()
    # the MAE-CT arm fails, late (stage 3) or at once (the MAE's evaluation), while MAE-CT_aug's head is training or
    # about to: that arm is stopped with the chain, never left running (its head has no DONE, now or later)
    for fail in ("ct", "eval_mae", "eval_mae"):
        t0 = time.monotonic()
        r, _ = fake_reproduce(tmp_path / f"fail_{fail}", "fashion_mnist", 1, ARMS="parallel", FAIL_OUT=fail,
                              SLOW_OUT="head_aug")
        run = tmp_path / f"fail_{fail}" / "run"
        assert r.returncode == 1 and time.monotonic() - t0 < 15 and not (run / "table.md").exists()
        if os.path.isdir("/proc"):
            time.sleep(0.5)
            assert not running(f"--out_dir {run / 'head_aug'}") and not (run / "head_aug" / "DONE").exists()
        shutil.rmtree(tmp_path / f"fail_{fail}")
    # on CPU each arm gets half the cores (stage 1 all of them), unless OMP_NUM_THREADS says otherwise
    for given, want in ((None, str(max(1, len(os.sched_getaffinity(0)) // 2))), ("1", "1")):  # nproc's count
        omp = {"OMP_NUM_THREADS": given} if given else {}
        fake_reproduce(tmp_path / f"cpu{given}", "cifar10_5k", 0, ARMS="parallel", **omp)
        run = tmp_path / f"cpu{given}" / "run"
        threads = {d: (run / d / "threads").read_text().strip() for d in ("mae", "head", "ct", "head_aug", "ct_aug")}
        assert threads == {"mae": given or "", **{d: want for d in ("head", "ct", "head_aug", "ct_aug")}}
    # a rerun with other stage-2 settings is refused with exit code 2, as in serial, whichever arm meets it first
    r, _ = fake_reproduce(tmp_path / "par", "fashion_mnist", 1, ARMS="parallel", E2="5")
    assert r.returncode == 2 and "was made with other settings" in r.stderr
    # refused where it does not fit, before anything is written: several GPUs (each arm uses them all), a typo
    for ngpu, arms in ((2, "parallel"), (1, "paralel")):
        r, calls = fake_reproduce(tmp_path / f"no{ngpu}", "fashion_mnist", ngpu, ARMS=arms)
        assert r.returncode == 2 and r.stderr.startswith("error: ARMS=") and not (tmp_path / f"no{ngpu}" / "run").exists()


def running(text):
    """Whether a live process has `text` in its command line (Linux /proc)."""
    for cmdline in glob.glob("/proc/[0-9]*/cmdline"):
        try:
            if text in open(cmdline, "rb").read().replace(b"\0", b" ").decode(errors="replace"):
                return True
        except OSError:
            pass  # the process ended meanwhile
    return False
