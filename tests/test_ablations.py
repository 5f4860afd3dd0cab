"""Tests of the ablation tools (issue 8): pretrain_mae.py --nnclr_weight (joint MAE + NNCLR), evaluate.py
--features projector/predictor, and ablations.sh end to end. CPU, vit_nano, a few steps each."""

import json
import os
import shutil
import subprocess

import pytest
import torch
import torch.nn.functional as F

from conftest import REPO, assert_same_state, fake_python, load_ckpt, ok, recorded_calls, run_here, run_script
from model import JointMAE, MaskedAutoencoder, model_config

SYNTH = ["--dataset", "synthetic", "--model", "vit_nano", "--device", "cpu", "--batch_size", "32", "--pictures", "0",
         "--epochs", "1", "--log_every", "1"]
HEAD = ["--proj_hidden", "32", "--proj_dim", "16", "--pred_hidden", "32", "--queue_size", "64"]
PLAIN_KEYS = {"stage", "config", "model", "optimizer", "step", "epoch", "seed", "args", "torchrun_id"}  # (common.want_resume)


def _log(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_joint_model_shapes_and_gradients():
    cfg = model_config("vit_nano", 32, 4, 3)
    torch.manual_seed(0)
    mae = MaskedAutoencoder(**cfg)
    joint = JointMAE(mae, 64, "mean", 32, 16, 32)
    views = [torch.randn(8, 3, 32, 32), torch.randn(8, 3, 32, 32)]
    mae_loss, nnclr, z0, nbrs = joint(views, torch.arange(8), 0.75, 0.15)
    assert mae_loss.shape == nnclr.shape == () and z0.shape == (8, 16) and nbrs.shape == (8,)
    assert torch.allclose(z0.norm(dim=1), torch.ones(8), atol=1e-5)
    # the state dict splits cleanly: "mae." + a plain MAE's keys, the rest is head and queue
    sd = joint.state_dict()
    assert {k[4:] for k in sd if k.startswith("mae.")} == set(MaskedAutoencoder(**cfg).state_dict())
    assert {k.split(".")[0] for k in sd if not k.startswith("mae.")} == {"head", "queue"}
    # the NNCLR loss trains the encoder too (that is the point of the ablation), the MAE loss never the head
    nnclr.backward(retain_graph=True)
    assert mae.blocks[0].attn.qkv.weight.grad.abs().sum() > 0 and mae.decoder_pred.weight.grad is None
    joint.zero_grad(set_to_none=True)
    mae_loss.backward()
    assert all(p.grad is None for p in joint.head.parameters())
    # the MAE part draws the same masking noise as a plain MAE on both views: equal loss, same seed
    torch.manual_seed(1)
    ref = mae(torch.cat(views), mask_ratio=0.75)[0]
    torch.manual_seed(1)
    assert torch.equal(joint(views, torch.arange(8), 0.75, 0.15)[0], ref)
    # masks given as noise, as pretrain_mae.py draws them (eagerly: the same in every compile mode), are those used
    noise = torch.rand(16, mae.grid ** 2)
    torch.manual_seed(2)
    ref = mae(torch.cat(views), mask_ratio=0.75, noise=noise)[0]
    assert torch.equal(joint(views, torch.arange(8), 0.75, 0.15, noise=noise)[0], ref)


def test_pretrain_gives_the_joint_model_its_masks(tmp_path, monkeypatch):
    import model
    seen = []
    forward = model.JointMAE.forward

    def spy(self, *a, noise=None, **k):
        seen.append(noise)
        return forward(self, *a, noise=noise, **k)
    monkeypatch.setattr(model.JointMAE, "forward", spy)
    ok(run_here("pretrain_mae.py", *SYNTH, "--max_steps", "2", "--nnclr_weight", "1", *HEAD, "--compile", "0",
                "--out_dir", tmp_path / "j"))
    assert len(seen) == 2 and all(n is not None and n.shape == (2 * 32, 64) for n in seen)


def test_joint_nnclr_loss_is_symmetric_cross_view_with_queue_neighbours():
    """The joint arm's NNCLR term recomputed by hand, as stages 2-3's (tests/test_contrastive.py): view a's nearest
    neighbour in the queue against view b's prediction and the other way round, averaged, on the visible tokens."""
    from model import pool
    from tests.test_contrastive import brute_force_nn, plain_loss
    torch.manual_seed(0)
    mae = MaskedAutoencoder(**model_config("vit_nano", 32, 4, 3))
    joint = JointMAE(mae, 64, "mean", 32, 16, 32)
    g = torch.Generator().manual_seed(1)
    joint.queue.embeddings.copy_(F.normalize(torch.randn(64, 16, generator=g), dim=1))
    joint.queue.indices.copy_(torch.randint(0, 20, (64,), generator=g))  # some slots hold the batch's own images
    views, idx = [torch.randn(8, 3, 32, 32), torch.randn(8, 3, 32, 32)], torch.arange(8)
    torch.manual_seed(2)
    _, nnclr, z0, _ = joint(views, idx, 0.75, 0.15)
    torch.manual_seed(2)  # the same masks
    with torch.no_grad():
        latent, _, _ = mae.forward_features(torch.cat(views), mask_ratio=0.75)  # (16, 1+16, D)
        proj = [joint.head.projector(f) for f in pool(latent, "mean").chunk(2)]
        pred = [F.normalize(joint.head.predictor(p), dim=1) for p in proj]
        z = [F.normalize(p, dim=1) for p in proj]
        nn = [joint.queue.embeddings[brute_force_nn(joint.queue, zz, idx)] for zz in z]
    expected = (plain_loss(nn[0], pred[1], 0.15) + plain_loss(nn[1], pred[0], 0.15)) / 2
    assert nnclr.item() == pytest.approx(expected, rel=1e-4)
    assert torch.allclose(z0, z[0], atol=1e-6)


@pytest.mark.slow
def test_nnclr_weight_zero_is_plain_mae_bit_for_bit(tmp_path, monkeypatch):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    ok(run_here("pretrain_mae.py", *SYNTH, "--max_steps", "3", "--out_dir", a))
    ok(run_here("pretrain_mae.py", *SYNTH, "--max_steps", "3", "--nnclr_weight", "0", *HEAD, "--out_dir", b))
    # c: the same run with every piece of the NNCLR code made to fail if it is built or called (all three run in
    # this process, conftest.run_here)
    import common
    import model

    def boom(*a, **k):
        raise AssertionError("--nnclr_weight 0 must not build or call any NNCLR code")
    for mod, name in [(model, "JointMAE"), (model, "NNCLRHead"), (model, "NNQueue"), (common, "check_queue"),
                      (common, "nn_accuracy")]:
        monkeypatch.setattr(mod, name, boom)
    ok(run_here("pretrain_mae.py", *SYNTH, "--max_steps", "3", "--out_dir", c))
    ca, cb, cc = (load_ckpt(p / "ckpt.pt") for p in (a, b, c))
    for ck in (ca, cb, cc):
        assert set(ck) == PLAIN_KEYS and ck["stage"] == "mae" and ck["args"]["num_views"] == 1
        assert set(ck["model"]) == set(MaskedAutoencoder(**ck["config"]).state_dict())
    assert_same_state(ca, cb)
    assert_same_state(ca, cc)
    assert [r["loss"] for r in _log(a / "log.jsonl")] == [r["loss"] for r in _log(c / "log.jsonl")]
    assert all(set(r) == {"step", "epoch", "loss", "lr", "img_per_s", "mem_gib"} for r in _log(b / "log.jsonl"))


@pytest.mark.slow
def test_nnclr_weight_zero_equals_the_code_before_the_flag(tmp_path):
    """Against pretrain_mae.py as it was before --nnclr_weight (git history), run with today's other modules."""
    try:
        old = subprocess.run(["git", "show", "705479d:pretrain_mae.py"], cwd=REPO, capture_output=True, text=True,
                             check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("the commit before --nnclr_weight is not in this checkout's history")
    script = tmp_path / "pretrain_mae_old.py"
    script.write_text(old)
    env = {"PYTHONPATH": str(REPO)}
    r = run_script(script, *SYNTH, "--max_steps", "3", "--out_dir", tmp_path / "old", env=env)
    if r.returncode != 0:
        pytest.skip(f"the old script no longer runs against today's modules: {r.stderr.strip().splitlines()[-1:]}")
    ok(run_script("pretrain_mae.py", *SYNTH, "--max_steps", "3", "--out_dir", tmp_path / "new"))
    old_ck, new_ck = load_ckpt(tmp_path / "old" / "ckpt.pt"), load_ckpt(tmp_path / "new" / "ckpt.pt")
    assert set(old_ck) == set(new_ck)
    assert_same_state(old_ck, new_ck)


@pytest.mark.slow
def test_joint_run_logs_both_losses_resumes_and_feeds_init_head(tmp_path):
    j = tmp_path / "joint"
    ok(run_here("pretrain_mae.py", *SYNTH, "--max_steps", "4", "--nnclr_weight", "0.5", *HEAD, "--out_dir", j))
    recs = [r for r in _log(j / "log.jsonl") if "loss" in r]
    assert [r["step"] for r in recs] == [1, 2, 3, 4]
    for r in recs:  # the total is the weighted sum of the two parts that are logged
        assert abs(r["loss"] - (r["mae_loss"] + 0.5 * r["nnclr_loss"])) < 1e-4 and 0 <= r["nn_acc"] <= 1
    ck = load_ckpt(j / "ckpt.pt")
    assert set(ck) == PLAIN_KEYS | {"nnclr_head"} and ck["stage"] == "mae" and ck["args"]["num_views"] == 2
    assert set(ck["model"]) == set(MaskedAutoencoder(**ck["config"]).state_dict())  # a plain MAE for stage 2
    assert ck["nnclr_head"]["queue.embeddings"].shape == (64, 16) and int(ck["nnclr_head"]["queue.ptr"]) == 0
    assert (ck["nnclr_head"]["queue.indices"] >= 0).all()  # 4 steps x 32 images filled the 64 slots twice
    # resume: 2 + 2 steps equal 4 steps, the head and queue included
    r2 = tmp_path / "resumed"
    ok(run_here("pretrain_mae.py", *SYNTH, "--max_steps", "2", "--nnclr_weight", "0.5", *HEAD, "--out_dir", r2))
    ok(run_here("pretrain_mae.py", *SYNTH, "--max_steps", "4", "--nnclr_weight", "0.5", *HEAD, "--resume", "--out_dir", r2))
    ck2 = load_ckpt(r2 / "ckpt.pt")
    assert_same_state(ck, ck2)
    for k in ck["nnclr_head"]:
        assert torch.equal(ck["nnclr_head"][k], ck2["nnclr_head"][k]), k
    # resuming with the other setting is refused, not silently half-loaded
    bad = run_here("pretrain_mae.py", *SYNTH, "--max_steps", "5", "--resume", "--out_dir", r2)
    assert bad.returncode != 0 and "nnclr_weight" in bad.stderr and "Traceback" not in bad.stderr
    # the joint checkpoint starts stage 2 like any stage-1 checkpoint (strict encoder loading)
    ok(run_here("init_head.py", "--init_from", j / "ckpt.pt", "--dataset", "synthetic", "--device", "cpu",
                "--batch_size", "32", "--max_steps", "2", *HEAD, "--out_dir", tmp_path / "head"))
    assert load_ckpt(tmp_path / "head" / "ckpt.pt")["stage"] == "head"


@pytest.mark.slow
def test_evaluate_projector_and_predictor_features(tmp_path, monkeypatch):
    import data
    monkeypatch.setattr(data, "SYNTHETIC_SIZES", dict(train=1000, val=300))  # smaller generated sets: a faster test
    ok(run_here("pretrain_mae.py", *SYNTH, "--max_steps", "2", "--out_dir", tmp_path / "mae"))
    ok(run_here("init_head.py", "--init_from", tmp_path / "mae" / "ckpt.pt", "--dataset", "synthetic", "--device",
                "cpu", "--batch_size", "32", "--max_steps", "3", *HEAD, "--out_dir", tmp_path / "head"))
    knn10 = {}
    for feats, dim in [("encoder", 64), ("projector", 16), ("predictor", 16)]:
        out = tmp_path / f"eval_{feats}"
        ok(run_here("evaluate.py", "--init_from", tmp_path / "head" / "ckpt.pt", "--device", "cpu", "--metrics",
                       "knn", "--features", feats, "--out_dir", out))
        res = json.loads((out / "results.json").read_text())
        assert res["features"] == feats and res["feature_dim"] == dim and res["stage"] == "head"
        knn10[feats] = res["knn10"]
    # each number is the k-NN of that output: recomputed from the checkpoint's encoder and head, in evaluate.py's
    # batches (projector and predictor have the same width, so only their values tell them apart)
    import common, evaluate
    from model import NNCLRHead, VisionTransformer, pool
    ck = load_ckpt(tmp_path / "head" / "ckpt.pt")
    cfg, enc_sd = common.encoder_from_checkpoint(ck, "head")
    encoder, a = VisionTransformer(**cfg).eval(), ck["args"]
    encoder.load_state_dict(enc_sd)
    head = NNCLRHead(cfg["embed_dim"], a["proj_hidden"], a["proj_dim"], a["pred_hidden"]).eval()
    head.load_state_dict({k[5:]: v for k, v in ck["model"].items() if k.startswith("head.")})
    outputs = {"encoder": lambda f: f, "projector": head.projector,
               "predictor": lambda f: head.predictor(head.projector(f))}

    def features(split, feats):
        ds = data.load_split("synthetic", None, split, 32)
        loader = data.ViewLoader(ds, 256, "eval", 1, 32, "cpu", shuffle=False, drop_last=False)
        with torch.no_grad():
            f = [outputs[feats](pool(encoder.forward_features(x), a["pooling"])) for _, (x,), _ in loader]
        return torch.cat(f), ds.labels

    expected = {}
    for feats in outputs:
        (tr, ytr), (va, yva) = features("train", feats), features("val", feats)
        trn, van = evaluate.standardise(tr, va)
        expected[feats] = evaluate.accuracy(evaluate.knn_predict(trn, ytr, van, 10, 10), yva)
    assert knn10 == pytest.approx(expected) and len(set(expected.values())) == 3, (knn10, expected)
    # a stage-1 checkpoint has no head: refused with a message
    r = run_here("evaluate.py", "--init_from", tmp_path / "mae" / "ckpt.pt", "--device", "cpu", "--features",
                 "projector", "--out_dir", tmp_path / "x")
    assert r.returncode != 0 and "stage-2/3" in r.stderr


@pytest.mark.slow
@pytest.mark.chain
def test_ablations_sh_and_reproduce_sh_smoke_end_to_end(tmp_path):
    """ablations.sh runs reproduce.sh's whole smoke chain (stage 1, both arms, three evaluations), then its own arms:
    one real run checks both scripts, and a rerun of reproduce.sh continues rather than starting over. (The recipe's
    own pooling, the CLS token, is run for real from a given MAE in tests/test_reproduce.py.)"""
    run = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k not in {"POOLING", "AUG", "SEED", "E1", "E2", "E3", "E3_AUG"}}
    env.update(OMP_NUM_THREADS="1", RUN=str(run), STEPS="1", TOPKS="1 5", LAMBDAS="1", METRICS="knn",
               EVAL="--metrics knn,kmeans --kmeans_seeds 2")  # EVAL: reproduce.sh's evaluations, METRICS: the arms'
    # --compile 0, a training-only flag that evaluate.py does not take, reaches the training runs only;
    # --num_workers=0 (both take it) reaches the evaluations too
    flags = ["smoke", "--device", "cpu", "--compile", "0", "--num_workers=0"]
    r = ok(subprocess.run(["bash", "ablations.sh", *flags], cwd=REPO, capture_output=True, text=True, timeout=600,
                          env=env))
    # reproduce.sh's part: five stages, three evaluations, its table (MAE-CT_aug with its own colour-view head)
    for stage in ("mae", "head", "ct", "head_aug", "ct_aug"):
        assert (run / stage / "ckpt.pt").exists() and (run / stage / "DONE").exists()
    first_eval = r.stdout.split("== evaluate.py", 1)[1].split("\n== ", 1)[0]  # its output up to the next stage
    assert '"num_workers": 0' in first_eval
    for d in ("eval_mae", "eval_ct", "eval_ct_aug"):
        res = json.loads((run / d / "results.json").read_text())
        assert 0 <= res["knn10"] <= 100 and res["kmeans_acc_mean"] is not None
    mae = json.loads((run / "eval_mae" / "results.json").read_text())
    rows = (run / "table.md").read_text().splitlines()
    row = lambda name: next(line for line in rows if line.startswith(f"| {name} |")).split("|")[2].strip()
    assert rows[0].startswith(f"{run}: stages 2-3 tuned the MAE's mean pooling")  # ablations.sh's pooling
    assert rows[4].startswith("| MAE (mean pooling) |")
    assert row("MAE (mean pooling)") == f"{mae['mean']['knn10']:.1f}" and row("MAE (CLS token)") == f"{mae['cls']['knn10']:.1f}"
    assert row("MAE-CT") == f"{json.loads((run / 'eval_ct' / 'results.json').read_text())['knn10']:.1f}"
    assert row("MAE-CT_aug") == f"{json.loads((run / 'eval_ct_aug' / 'results.json').read_text())['knn10']:.1f}"
    ha, hb = (load_ckpt(run / s / "ckpt.pt")["args"] for s in ("head", "head_aug"))
    assert (ha["views"], hb["views"]) == ("minimal", "aug") and {k for k in ha if ha[k] != hb[k]} == {"views", "out_dir"}
    a, b = (load_ckpt(run / s / "ckpt.pt")["args"] for s in ("ct", "ct_aug"))  # stage 3 takes the views from the head
    assert (a["init_from"], b["init_from"]) == (str(run / "head" / "ckpt.pt"), str(run / "head_aug" / "ckpt.pt"))
    assert (a["views"], b["views"], a["head_blr"], b["head_blr"]) == ("minimal", "aug", 1e-4, 5e-4)
    assert {k for k in a if a[k] != b[k]} == {"init_from", "views", "head_blr", "out_dir"}
    # reproduce.sh rerun as ablations.sh called it: every stage and evaluation is skipped, the table printed again
    rerun = dict(env, POOLING="mean", AUG="1", E1="10", E2="5", E3="5", E3_AUG="5")  # ablations.sh's smoke epochs
    r2 = ok(subprocess.run(["bash", "reproduce.sh", *flags], cwd=REPO, capture_output=True, text=True, timeout=120,
                           env=rerun))
    assert r2.stdout.count("skipped") == 8 and "pretrain_mae.py ->" not in r2.stdout
    assert "| MAE-CT |" in r2.stdout and "| MAE-CT_aug |" in r2.stdout
    # a rerun with other stage-3 settings stops at stage 3 instead of reporting the old run under the new recipe
    r3 = subprocess.run(["bash", "reproduce.sh", *flags], cwd=REPO, capture_output=True, text=True, timeout=120,
                        env=dict(rerun, E3="2"))
    assert r3.returncode == 2 and r3.stderr.strip().splitlines()[-1].startswith(f"error: {run / 'ct'} was made with other settings")
    assert "contrastive_tune.py ->" not in r3.stdout and r3.stdout.count("skipped") == 3
    # ablations.sh's part: its three tables
    table = (run / "ablations.md").read_text()
    for heading in ("## 1.", "## 2.", "## 3."):
        assert heading in table
    assert "| projector | 128 |" in table and "| top-1, crop+flip |" in table and "| joint, lambda = 1 |" in table
    # table 1's encoder row is stage 1's evaluation (mean pooling): stage 2 leaves the encoder as it was
    assert f"| encoder | 64 | {mae['mean']['knn10']:.1f} | {mae['mean']['knn20']:.1f} |" in table
    assert not (run / "abl" / "f1_encoder").exists() and (run / "abl" / "f1_predictor" / "results.json").exists()
    assert (run / "abl" / "ct_k5").resolve() == (run / "ct").resolve()  # reproduce.sh's stage 3 is reused
    assert (run / "abl" / "ct_aug").resolve() == (run / "ct_aug").resolve()  # and its MAE-CT_aug
    assert "(reproduce.sh MAE-CT_aug) |" in table
    joint = load_ckpt(run / "abl" / "joint_l1" / "ckpt.pt")
    assert joint["args"]["nnclr_weight"] == 1.0
    # every arm tunes the joint arm's pooling (the model's mean), though the smoke recipe alone tunes the CLS token
    arms = [run / "head", run / "ct", run / "ct_aug", run / "abl" / "ct_k1"]
    assert [load_ckpt(a / "ckpt.pt")["args"]["pooling"] for a in arms] == [joint["config"]["pooling"]] * 4 == ["mean"] * 4


def test_ablations_sh_refuses_a_given_mae_or_another_pooling(tmp_path):
    """MAE= would skip the sequential stage 1 while the joint arm still trains from scratch: unequal budgets; and
    POOLING=cls would tune another feature than the joint arm's head sits on."""
    env = {**os.environ, "MAE": str(tmp_path / "mae.pth"), "RUN": str(tmp_path / "run")}
    r = subprocess.run(["bash", "ablations.sh", "smoke", "--device", "cpu"], cwd=REPO, capture_output=True,
                       text=True, timeout=60, env=env)
    assert r.returncode == 2 and "unset MAE" in r.stderr and not (tmp_path / "run").exists()
    env.pop("MAE")
    r = subprocess.run(["bash", "ablations.sh", "smoke", "--device", "cpu"], cwd=REPO, capture_output=True,
                       text=True, timeout=60, env=dict(env, POOLING="cls"))
    assert r.returncode == 2 and "POOLING='cls'" in r.stderr and not (tmp_path / "run").exists()


def fake_ablations(tmp_path, recipe="smoke"):
    """ablations.sh `recipe` (top-1 arm, no joint arm) in a copy, with a fake python that records each stage call in
    tmp_path/calls.log and leaves results just rich enough for the tables: returns (ablate(**env), run, calls)."""
    work, run = tmp_path / "repo", tmp_path / "run"
    work.mkdir()
    for f in ("ablations.sh", "reproduce.sh", "lib.sh", *(p.name for p in REPO.glob("*.py"))):  # (reproduce.sh's
        shutil.copy(REPO / f, work / f)                                                             # flag check)
    fake_python(tmp_path / "bin")
    calls = tmp_path / "calls.log"
    env = {"PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}", "HOME": str(tmp_path), "CALLS": str(calls),
           "RUN": str(run), "TOPKS": "1", "LAMBDAS": ""}
    ablate = lambda **e: subprocess.run(["bash", str(work / "ablations.sh"), recipe, "--device", "cpu"],
                                        capture_output=True, text=True, timeout=60, env={**env, **e})
    return ablate, run, calls


@pytest.mark.parametrize("recipe,label", [("smoke", "head_blr 5e-4, its own"),
                                          ("cifar10_5k", "head_blr 5e-4, encoder blr 1e-3, its own")])
def test_ablations_sh_aug_row_names_the_encoder_lr_it_was_tuned_at(tmp_path, recipe, label):
    """Table 2's MAE-CT_aug row reads the encoder blr from reproduce.sh's command line for that stage: cifar10_5k
    tunes it at 10x the paper's lr (RESULTS.md, session 21), smoke at the paper's, which the row then does not name."""
    ablate, run, calls = fake_ablations(tmp_path, recipe)
    ok(ablate())
    row = next(line for line in (run / "ablations.md").read_text().splitlines() if "(reproduce.sh MAE-CT_aug)" in line)
    assert f"| top-5, BYOL colour views, {label} colour-view head" in row, row  # both recipes look up the top 5
    blrs = [a[a.index("--blr") + 1] for a, _ in recorded_calls(calls) if "ct_aug" in " ".join(a) and "--blr" in a]
    assert blrs == (["1e-3"] if recipe == "cifar10_5k" else [])  # the label and the stage's own flag agree


def test_ablations_sh_arms_made_from_an_earlier_head_or_other_settings_are_not_reused(tmp_path):
    """Its arms keep their settings and the head they were made from (lib.sh), as reproduce.sh's stages: with a
    fake python that records the stage calls."""
    ablate, run, calls = fake_ablations(tmp_path)
    ok(ablate())  # every stage and arm, and the tables
    assert (run / "abl" / "ct_k1" / "FROM").read_text() == (run / "head" / "ID").read_text()
    for d in ("head", "ct"):  # stage 2 again (as after a change of its settings), and what reproduce.sh made from it
        shutil.rmtree(run / d)
    calls.write_text("")
    r = ablate()
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1] == (
        f"error: {run}/abl/ct_k1 was made from an earlier {run}/head, trained again since; delete it or use another RUN=")
    assert [a[0] for a, _ in recorded_calls(calls)] == ["init_head.py", "contrastive_tune.py", "evaluate.py",
                                                       "evaluate.py", "evaluate.py"]  # head, ct, eval_ct, f1 x 2
    assert "abl/ct_k1" not in calls.read_text()
    shutil.rmtree(run / "abl" / "ct_k1")
    ablate()
    for d in ("ct", "ct_aug"):  # reproduce.sh's stage-3 arms deleted, to tune for other epochs: they train again,
        shutil.rmtree(run / d)
    r = ablate(E3="7")  # but the arm made with the old ones stops the rerun
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith(
        f"error: {run}/abl/ct_k1 was made with other settings (contrastive_tune.py --dataset synthetic")
