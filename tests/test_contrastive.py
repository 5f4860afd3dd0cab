"""Stages 2 and 3: the queue lookup, the NNCLR loss, DDP equivalence, freezing, layer decay, EMA, resume, bad input."""
import argparse
import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import common
import model
from model import MAECT, MaskedAutoencoder, NNQueue, init_weights, model_config, nnclr_loss
from tests.conftest import assert_same_state, run_here, run_in_process, run_script, run_torchrun
from tests.nnclr_case import HEAD, make_case

ROOT = Path(__file__).resolve().parents[1]
SMALL_HEAD = ["--proj_hidden", "32", "--proj_dim", "16", "--pred_hidden", "32"]


def run(script, *args, env=None):
    """`python script args` as a CompletedProcess, run in this process (conftest.run_here): these tests start
    dozens of short stage runs, and a subprocess each would pay a 4-second torch import on a slow 2-core machine."""
    return run_here(script, *args, env=env)


# ---------------------------------------------------------------- queue
def filled_queue(size=64, dim=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = NNQueue(size, dim)
    q.embeddings.copy_(F.normalize(torch.randn(size, dim, generator=g), dim=1))
    q.indices.copy_(torch.randint(0, 20, (size,), generator=g))
    return q


def brute_force_nn(q, z, idx):
    out = []
    for i in range(z.shape[0]):
        best, best_sim = None, -2.0
        for j in range(q.embeddings.shape[0]):
            if q.indices[j] == idx[i]:
                continue
            s = float(z[i] @ q.embeddings[j])
            if s > best_sim:
                best, best_sim = j, s
        out.append(best)
    return torch.tensor(out)


def test_lookup_is_true_nearest_neighbour_and_skips_same_sample():
    q = filled_queue()
    z = F.normalize(torch.randn(12, 8), dim=1)
    idx = torch.randint(0, 20, (12,))
    nn, slots = q.lookup(z, idx, topk=1)
    assert torch.equal(slots, brute_force_nn(q, z, idx))
    assert torch.equal(nn, q.embeddings[slots])
    assert not (q.indices[slots] == idx).any()


def test_lookup_never_returns_own_sample_even_when_it_is_closest():
    q = filled_queue()
    z = q.embeddings[:5].clone()  # each query is exactly an entry of its own sample
    idx = q.indices[:5].clone()
    _, slots = q.lookup(z, idx, topk=1)
    assert not (q.indices[slots] == idx).any()
    _, slots = q.lookup(z, idx, topk=4)
    assert not (q.indices[slots] == idx).any()


def test_topk_draws_only_from_true_topk_and_covers_it():
    q = filled_queue()
    z = F.normalize(torch.randn(3, 8), dim=1)
    idx = torch.full((3,), -5)  # no entry shares the sample
    k = 5
    true_topk = (z @ q.embeddings.T).topk(k, dim=1).indices
    seen = [set() for _ in range(3)]
    for s in range(200):
        torch.manual_seed(s)
        _, slots = q.lookup(z, idx, topk=k)
        for i in range(3):
            assert int(slots[i]) in set(true_topk[i].tolist())
            seen[i].add(int(slots[i]))
    assert all(len(s) == k for s in seen), "uniform draw from the top-k should reach all k entries"



def test_topk_as_long_as_the_queue_never_draws_the_query_itself():
    """--topk may equal the queue size (check_queue allows it), so the top-k then holds the query's own entries,
    excluded at -inf: the draw is uniform over the other entries and never reaches those."""
    q = NNQueue(6, 4)
    q.embeddings.copy_(F.normalize(torch.randn(6, 4, generator=torch.Generator().manual_seed(0)), dim=1))
    q.indices.copy_(torch.tensor([7, 1, 7, 2, 3, 4]))  # sample 7 twice in the queue
    z, idx = q.embeddings[[0, 1]].clone(), torch.tensor([7, 1])
    counts = torch.zeros(2, 6)
    for s in range(600):
        torch.manual_seed(s)
        _, slots = q.lookup(z, idx, topk=6)
        counts[0, slots[0]] += 1
        counts[1, slots[1]] += 1
    assert counts[0, [0, 2]].sum() == 0 and counts[1, 1] == 0  # never the query's own sample
    assert (counts[0, [1, 3, 4, 5]] > 90).all() and (counts[1, [0, 2, 3, 4, 5]] > 70).all()  # uniform over the rest

def test_fifo_order_and_wraparound():
    q = NNQueue(6, 4)
    batches = [(F.normalize(torch.randn(2, 4), dim=1), torch.tensor([10 * b, 10 * b + 1])) for b in range(4)]
    for z, i in batches[:3]:
        q.enqueue(z, i)
    assert int(q.ptr) == 0  # 3 batches of 2 fill 6 slots and wrap to the start
    assert q.indices.tolist() == [0, 1, 10, 11, 20, 21]
    q.enqueue(*batches[3])  # the oldest entries are overwritten first
    assert q.indices.tolist() == [30, 31, 10, 11, 20, 21]
    assert torch.equal(q.embeddings[:2], batches[3][0])
    assert int(q.ptr) == 2


# ---------------------------------------------------------------- loss
def plain_loss(nn_a, pred_b, t):
    """The NNCLR loss written out: -log softmax of the matching pair, averaged."""
    total = 0.0
    for i in range(nn_a.shape[0]):
        logits = [float(nn_a[i] @ pred_b[j]) / t for j in range(pred_b.shape[0])]
        m = max(logits)
        total += -(logits[i] - m - torch.log(torch.tensor([l - m for l in logits]).exp().sum()).item())
    return total / nn_a.shape[0]


def test_loss_equals_plain_recomputation():
    a, b = F.normalize(torch.randn(6, 5), dim=1), F.normalize(torch.randn(6, 5), dim=1)
    assert nnclr_loss(a, b, 0.15).item() == pytest.approx(plain_loss(a, b, 0.15), rel=1e-5)


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_model_loss_is_symmetric_cross_view_with_queue_neighbours(pooling):
    model, views, idx, kw = make_case(stage3=False)
    model.pooling = pooling
    loss, z0, _ = model(views, idx, **kw)
    with torch.no_grad():  # recompute by hand
        feats = model.encoder(torch.cat(views), pooling).chunk(2)
        proj = [model.head.projector(f) for f in feats]
        pred = [F.normalize(model.head.predictor(p), dim=1) for p in proj]
        z = [F.normalize(p, dim=1) for p in proj]
        nn = [model.queue.embeddings[brute_force_nn(model.queue, zz, idx)] for zz in z]
    expected = (plain_loss(nn[0], pred[1], kw["temperature"]) + plain_loss(nn[1], pred[0], kw["temperature"])) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-4)
    assert torch.allclose(z0, z[0], atol=1e-6)


def test_stage3_lookup_and_queue_use_the_target_projector():
    """Stage 3: the EMA target projector, not the online one, embeds the lookup's queries and what is enqueued;
    the predictions come from the online head. make_case starts the target as a copy of the projector, so it
    gets other weights here for the two to differ."""
    model, views, idx, kw = make_case(stage3=True)
    with torch.no_grad():
        for p in model.target_projector.parameters():
            p.add_(0.5 * torch.randn_like(p))
    loss, z0, _ = model(views, idx, **kw)
    with torch.no_grad():
        feats = model.encoder(torch.cat(views), "mean").chunk(2)
        pred = [F.normalize(model.head.predictor(model.head.projector(f)), dim=1) for f in feats]
        z = [F.normalize(model.target_projector(f), dim=1) for f in feats]
        online = F.normalize(model.head.projector(feats[0]), dim=1)
        nn = [model.queue.embeddings[brute_force_nn(model.queue, zz, idx)] for zz in z]
    expected = (plain_loss(nn[0], pred[1], kw["temperature"]) + plain_loss(nn[1], pred[0], kw["temperature"])) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-4)
    assert torch.allclose(z0, z[0], atol=1e-6) and not torch.allclose(z0, online, atol=1e-2)


@pytest.fixture(scope="module")
def two_rank_steps(needs_torchrun, tmp_path_factory):
    """One NNCLR step of the stage-2 and of the stage-3 case under torchrun --nproc_per_node=2 (gloo), both in one
    launch: tests/ddp_nnclr.py's results, as the path prefix of its two files."""
    prefix = tmp_path_factory.mktemp("ddp") / "case"
    # --standalone picks a free rendezvous port (a fixed one collided once under load)
    r = run_torchrun(ROOT / "tests" / "ddp_nnclr.py", prefix, timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    return prefix


@pytest.mark.parametrize("stage3", [False, True])
def test_two_ranks_equal_one_process(two_rank_steps, stage3):
    """torchrun --nproc_per_node=2 (gloo): loss, gradients, BN statistics and the queue after one step equal a
    single process given the concatenated batch."""
    got = torch.load(f"{two_rank_steps}{int(stage3)}.pt", weights_only=True)
    model, views, idx, kw = make_case(stage3)
    loss, z0, _ = model(views, idx, **kw)
    loss.backward()
    model.queue.enqueue(z0, idx)
    assert got["loss"].item() == pytest.approx(loss.item(), rel=1e-5)
    grads = {k: p.grad for k, p in model.named_parameters() if p.grad is not None}
    assert got["grads"].keys() == grads.keys() and len(grads) > 0
    # fp32 sums run in another order over 2 ranks, so the error scales with the largest gradient, not each entry's
    # own: encoder.norm.bias's gradient is zero but for rounding (the head's BatchNorm removes a constant shift)
    scale = max(g.abs().max() for g in grads.values())
    for k in grads:
        assert torch.allclose(got["grads"][k], grads[k], rtol=1e-4, atol=1e-5 * scale), k
    for k, v in model.queue.state_dict().items():
        assert torch.allclose(got["queue"][k].float(), v.float(), atol=1e-6), k
    for k, v in got["bn"].items():
        assert torch.allclose(v, model.state_dict()[k], rtol=1e-4, atol=1e-6), k


# ---------------------------------------------------------------- EMA and layer decay
def test_ema_update_equals_closed_form():
    m = 0.9
    target, online = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    t0 = target.weight.detach().clone()
    history = []
    for _ in range(5):
        with torch.no_grad():
            online.weight.add_(torch.randn(2, 3))
        history.append(online.weight.detach().clone())
        common.ema_update(target, online, m)
    k = len(history)
    closed = m ** k * t0 + sum((1 - m) * m ** (k - 1 - j) * h for j, h in enumerate(history))
    assert torch.allclose(target.weight, closed, atol=1e-6)


def test_layer_decay_groups():
    from contrastive_tune import param_groups
    cfg = model_config("vit_nano", 16, 4, 3)
    model = MAECT(cfg, 16, "mean", **HEAD, target=True)
    args = argparse.Namespace(frozen_blocks=2, layer_decay=0.5, weight_decay=0.05, head_weight_decay=1e-5,
                              head_blr=3e-4, blr=1e-4)
    groups = param_groups(model, args)
    scale_of = {id(p): (g["lr_scale"], g["weight_decay"]) for g in groups for p in g["params"]}
    depth = cfg["depth"]
    for b in range(depth):
        for n, p in model.encoder.blocks[b].named_parameters():
            if b < 2:
                assert id(p) not in scale_of
            else:
                assert scale_of[id(p)] == (0.5 ** (depth - b), 0.0 if p.ndim == 1 else 0.05), (b, n)
    for p in model.encoder.norm.parameters():
        assert scale_of[id(p)][0] == 1.0
    for n, p in model.head.named_parameters():
        assert scale_of[id(p)] == (pytest.approx(3.0), 0.0 if p.ndim == 1 else 1e-5)
    assert all(id(p) not in scale_of for p in model.target_projector.parameters())
    opt = torch.optim.AdamW(groups, lr=0.0)
    common.set_lr(opt, 2e-3)
    assert all(g["lr"] == pytest.approx(2e-3 * g["lr_scale"]) for g in opt.param_groups)


# ---------------------------------------------------------------- the scripts
@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """A stage-1 checkpoint (vit_nano, untrained: these tests are about mechanics) and a short stage 2, with the
    head's weights as stage 2 made them (head_start.pt)."""
    d = tmp_path_factory.mktemp("chain")
    cfg = model_config("vit_nano", 32, 4, 3)
    mae = init_weights(MaskedAutoencoder(**cfg))
    common.save_checkpoint(str(d / "mae.pt"), stage="mae", config=cfg, model=mae.state_dict(), step=0)
    made = []

    def recording(*args, **kwargs):
        m = MAECT(*args, **kwargs)
        made.append({k: v.clone() for k, v in m.head.state_dict().items()})
        return m
    with pytest.MonkeyPatch.context() as mp:  # the script runs in this process: it imports the patched class
        mp.setattr(model, "MAECT", recording)
        r = run("init_head.py", "--init_from", d / "mae.pt", "--dataset", "synthetic", "--epochs", "1", "--batch_size",
                "64", "--max_steps", "4", "--out_dir", d / "head", "--device", "cpu", "--warmup_epochs", "0.1",
                *SMALL_HEAD)
    assert r.returncode == 0, r.stderr[-2000:]
    torch.save(made[0], d / "head_start.pt")
    return d


def test_stage2_leaves_encoder_bit_identical(chain):
    mae = torch.load(chain / "mae.pt", weights_only=True)["model"]
    head = torch.load(chain / "head" / "ckpt.pt", weights_only=True)
    assert head["stage"] == "head" and head["step"] == 4
    enc = {k[len("encoder."):]: v for k, v in head["model"].items() if k.startswith("encoder.")}
    assert enc.keys() and all(torch.equal(v, mae[k]) for k, v in enc.items())
    start = torch.load(chain / "head_start.pt", weights_only=True)
    still = [k for k, v in start.items() if torch.equal(v, head["model"]["head." + k])]
    assert start and not still, f"every weight and statistic of the head should have trained: {still}"
    assert (head["model"]["queue.indices"] >= 0).sum() == 4 * 64  # 4 steps of 64 enqueued


def mae_cfg(chain):
    return torch.load(chain / "mae.pt", weights_only=True)["config"]


def ct(chain, out, *extra):
    return run("contrastive_tune.py", "--init_from", chain / "head" / "ckpt.pt", "--dataset", "synthetic",
               "--epochs", "1", "--batch_size", "64", "--out_dir", out, "--device", "cpu", "--warmup_epochs", "0.1",
               "--topk", "3", *extra)


@pytest.mark.parametrize("script", ["init_head.py", "contrastive_tune.py"])
def test_crop_min_reaches_the_views(chain, tmp_path, monkeypatch, script):
    """--crop_min becomes the views' crop scale (crop_min, 1) in stages 2 and 3."""
    import data
    seen = []

    class Spy(data.ViewLoader):
        def __init__(self, *args, crop_scale=None, **kw):
            seen.append(crop_scale)
            super().__init__(*args, crop_scale=crop_scale, **kw)

    monkeypatch.setattr(data, "ViewLoader", Spy)
    init = chain / "mae.pt" if script == "init_head.py" else chain / "head" / "ckpt.pt"
    extra = SMALL_HEAD if script == "init_head.py" else ["--topk", "3"]
    code, _, err = run_in_process(script, "--init_from", init, "--dataset", "synthetic",
                                  "--epochs", "1", "--batch_size", "64", "--max_steps", "1", "--warmup_epochs", "0.1",
                                  "--out_dir", tmp_path / "o", "--device", "cpu", "--crop_min", "0.7", *extra)
    assert code == 0, err[-2000:]
    assert seen == [(0.7, 1.0)]


def test_stage3_freezes_lower_half_and_trains_upper(chain, tmp_path):
    r = ct(chain, tmp_path / "ct", "--max_steps", "3")
    assert r.returncode == 0, r.stderr[-2000:]
    before = torch.load(chain / "head" / "ckpt.pt", weights_only=True)["model"]
    after = torch.load(tmp_path / "ct" / "ckpt.pt", weights_only=True)
    assert after["stage"] == "ct"
    assert (after["args"]["temperature"], after["args"]["target_ema"]) == (0.15, 0.99)  # the paper's, for nano as B
    for k, v in before.items():
        if not k.startswith("encoder.") or "pos_embed" in k:
            continue
        frozen = k.startswith(("encoder.patch_embed", "encoder.cls_token", "encoder.blocks.0.", "encoder.blocks.1."))
        assert torch.equal(v, after["model"][k]) == frozen, k
    # the target projector is an EMA of the projector: moved, but less than the projector itself
    w0 = before["head.projector.0.weight"]
    d_online = (after["model"]["head.projector.0.weight"] - w0).norm()
    d_target = (after["model"]["target_projector.0.weight"] - w0).norm()
    assert 0 < d_target < 0.1 * d_online  # momentum 0.99 over 3 steps: ~1-3% of the way (an inverted one: ~99%)


@pytest.mark.parametrize("script", ["init_head.py", "contrastive_tune.py"])
def test_frozen_parts_are_exactly_the_papers_and_run_without_gradient(chain, tmp_path, monkeypatch, script):
    """The freeze boundary, from every side: stage 2 freezes the whole encoder (final norm too), stage 3 the patch
    embedding, CLS token and lower half (blocks 0-1 of nano's 4; the EMA target projector never trains). The
    parameters that require a gradient are exactly those the optimiser holds and exactly those that get a gradient
    in a step; the frozen blocks run with gradient off and in eval mode, the trained ones with it on. (The
    weight-comparison test above misses a block frozen on one side of the boundary only: a block whose parameters
    require no gradient but that runs with it on just wastes memory, one that requires it but runs without it, or
    that the optimiser leaves out, never moves either way.)"""
    seen_model, opts, blocks, enc_out, modes = [], [], [], [], []
    real_forward, real_adamw = MAECT.forward, common.adamw

    def forward(self, *args, **kw):
        modes.append((self.head.training, self.target_projector is not None and self.target_projector.training))
        if not seen_model:  # hooks on the first call: record how each block and the encoder ran
            seen_model.append(self)
            for b, blk in enumerate(self.encoder.blocks):
                blk.register_forward_hook(lambda m, i, o, b=b: blocks.append((b, torch.is_grad_enabled(), m.training)))
            self.encoder.register_forward_hook(lambda m, i, o: enc_out.append(o.requires_grad))
        return real_forward(self, *args, **kw)
    monkeypatch.setattr(MAECT, "forward", forward)
    monkeypatch.setattr(common, "adamw", lambda *a, **kw: opts.append(real_adamw(*a, **kw)) or opts[-1])
    r = run(script, *stage_args(chain, script), "--dataset", "synthetic", "--epochs", "1", "--batch_size", "64",
            "--max_steps", "1", "--warmup_epochs", "0.1", "--out_dir", tmp_path, "--device", "cpu")
    assert r.returncode == 0, r.stderr[-2000:]
    (model,), (opt,) = seen_model, opts
    stage3 = script == "contrastive_tune.py"
    frozen_blocks = 2 if stage3 else 4
    assert len(model.encoder.blocks) == 4  # vit_nano

    def trained(name):
        if name.startswith("head."):
            return True
        if not stage3 or name.startswith(("target_projector.", "encoder.patch_embed.", "encoder.cls_token")):
            return False
        return name.startswith("encoder.norm.") or int(name.split(".")[2]) >= frozen_blocks
    params = dict(model.named_parameters())
    expected = {n for n in params if trained(n)}
    assert {n for n, p in params.items() if p.requires_grad} == expected
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert {n for n, p in params.items() if id(p) in in_opt} == expected
    assert len(in_opt) == len(expected)  # nothing else (no parameter of another module)
    assert {n for n, p in params.items() if p.grad is not None} == expected  # after the step: frozen ones got none
    assert blocks == [(b, b >= frozen_blocks, b >= frozen_blocks) for b in range(4)]  # one encoder pass (both views)
    assert enc_out == [stage3]  # stage 2: the whole encoder, final norm included, builds no graph at all
    # The head, and stage 3's EMA target projector too, run in training mode: their BatchNorms normalise with the
    # batch's statistics (as the authors' target copy does), not with running statistics carried over from stage 2.
    assert modes == [(True, stage3)]  # (stage 2 has no target projector: its lookup uses the online projector)


@pytest.mark.parametrize("script", ["init_head.py", "pretrain_mae.py"])
def test_nn_acc_is_read_before_the_enqueue_overwrites_the_neighbours(chain, tmp_path, script):
    """The logged nn_acc is about the neighbours the lookup found. With the queue as long as the batch, step 1 finds
    an empty queue (index -1, never right): nn_acc 0 exactly. Read after the enqueue, as until session 13, the slots
    held the current batch's images and it came out near chance (0.1) instead."""
    if script == "init_head.py":
        args = ["--init_from", chain / "mae.pt", *SMALL_HEAD]
    else:  # the joint ablation (MAE + NNCLR from the start) logs it too
        args = ["--model", "vit_nano", "--nnclr_weight", "1", *SMALL_HEAD]
    r = run(script, *args, "--dataset", "synthetic", "--device", "cpu", "--batch_size", "128", "--queue_size", "128",
            "--max_steps", "2", "--log_every", "1", "--out_dir", tmp_path / "o")
    assert r.returncode == 0, r.stderr[-2000:]
    logs = [json.loads(line) for line in (tmp_path / "o" / "log.jsonl").read_text().splitlines()]
    assert logs[0]["step"] == 1 and logs[0]["nn_acc"] == 0.0
    assert logs[1]["nn_acc"] > 0  # step 2 looks up step 1's images, some of them of the query's class


def stage_args(chain, script):
    """The input checkpoint and the flags of a one-epoch CPU run of stage 2 or 3 on the chain's files."""
    if script == "init_head.py":
        return ["--init_from", chain / "mae.pt", *SMALL_HEAD]
    return ["--init_from", chain / "head" / "ckpt.pt", "--topk", "3"]


@pytest.mark.parametrize("script", ["init_head.py", "contrastive_tune.py"])
def test_reduce_overhead_compiles_the_whole_forward_as_one_graph(chain, tmp_path, monkeypatch, script):
    """--compile_mode reduce-overhead compiles the MAECT forward as a whole (so the frozen encoder's output never
    leaves the graph), the default mode the encoder and the head, in stages 2 and 3. Spied in process, then one real
    compiled run on CPU against eager."""
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda m, **kw: compiled.append((type(m).__name__, kw.get("mode"))) or m)
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: compiled.append((type(self).__name__, kw.get("mode"))))
    common_args = [*stage_args(chain, script), "--dataset", "synthetic", "--epochs", "1", "--batch_size", "64",
                   "--max_steps", "1", "--device", "cpu", "--compile", "1"]
    for mode, expected in [("reduce-overhead", [("MAECT", "reduce-overhead")]),
                           ("default", [("VisionTransformer", "default"), ("NNCLRHead", "default")])]:
        compiled.clear()
        code, _, err = run_in_process(script, *common_args, "--compile_mode", mode,
                                      "--out_dir", tmp_path / mode)
        assert code == 0 and compiled == expected, (mode, compiled, err[-2000:])
    monkeypatch.undo()
    # compiled for real (on CPU: no CUDA graphs, but the same single graph) against eager; top-1 lookup (stage 2
    # always), so that no random draw differs between inductor's random stream and eager's: the same training up to
    # float rounding. The timeout allows a cold inductor cache (a fresh machine): the compiled run alone took ~60 s then
    # on a slow 2-core machine, and past 120 s beside the other pytest worker under torch 2.11
    runs = {}
    for name, flags in [("eager", ["--compile", "0"]), ("graph", ["--compile", "1", "--compile_mode", "reduce-overhead"])]:
        r = run_script(script, *stage_args(chain, script), "--dataset", "synthetic", "--epochs", "1", "--batch_size", "64",
                "--device", "cpu", "--warmup_epochs", "0.1", "--max_steps", "3", "--log_every", "1",
                *(["--topk", "1"] if script == "contrastive_tune.py" else []), *flags, "--out_dir", tmp_path / name,
                timeout=400)
        assert r.returncode == 0, r.stderr[-2000:]
        log = [json.loads(line) for line in (tmp_path / name / "log.jsonl").read_text().splitlines()]
        runs[name] = ([x["loss"] for x in log], torch.load(tmp_path / name / "ckpt.pt", weights_only=True)["model"])
    (loss_e, sd_e), (loss_g, sd_g) = runs["eager"], runs["graph"]
    assert len(loss_g) == 3 and loss_g == pytest.approx(loss_e, abs=1e-4)
    assert torch.equal(sd_g["queue.indices"], sd_e["queue.indices"])
    apart = {k: (sd_g[k] - v).abs().max().item() for k, v in sd_e.items()
             if v.is_floating_point() and not torch.allclose(sd_g[k], v, atol=1e-4)}
    assert not apart, apart  # the tensors that differ, and by how much
    before = torch.load(stage_args(chain, script)[1], weights_only=True)["model"]
    w = "blocks.3.attn.qkv.weight"  # stage 2: the encoder frozen bit for bit in the graph too; stage 3: trained
    if script == "init_head.py":
        assert torch.equal(sd_g["encoder." + w], before[w])
    else:
        assert not torch.equal(sd_g["encoder." + w], before["encoder." + w])


def test_paper_defaults_follow_the_variant_and_the_model_size():
    from contrastive_tune import paper_defaults
    keys = ("temperature", "target_ema", "epochs", "topk", "head_blr")
    # the authors' stage-3 configs (ml-jku/MAE-CT yamls/stage3_*): MAE-CT, then MAE-CT_aug (its H from H/14's)
    expected = {("minimal", "vit_nano"): (0.15, 0.99, 20, 20, 1e-4), ("minimal", "vit_base"): (0.15, 0.99, 20, 20, 1e-4),
                ("minimal", "vit_large"): (0.2, 0.99, 20, 20, 1e-4), ("minimal", "vit_huge"): (0.3, 0.995, 30, 20, 1e-4),
                ("aug", "vit_tiny"): (0.15, 0.99, 80, 10, 5e-4), ("aug", "vit_base"): (0.15, 0.99, 80, 10, 5e-4),
                ("aug", "vit_large"): (0.15, 0.99, 40, 10, 5e-4), ("aug", "vit_huge"): (0.35, 0.995, 40, 20, 5e-4)}
    for (views, name), values in expected.items():
        args = argparse.Namespace(views=views, **dict.fromkeys(keys))
        paper_defaults(args, name)
        assert tuple(getattr(args, k) for k in keys) == values, (views, name)
    given = argparse.Namespace(views="aug", temperature=0.5, target_ema=0.9, epochs=3, topk=7, head_blr=1e-3)
    paper_defaults(given, "vit_huge")
    assert tuple(getattr(given, k) for k in keys) == (0.5, 0.9, 3, 7, 1e-3)  # flags win


def test_stage3_takes_the_size_defaults_from_the_checkpoint(chain, tmp_path):
    """The model size is read from the stage-2 checkpoint: a head labelled ViT-H runs with H's settings."""
    ckpt = torch.load(chain / "head" / "ckpt.pt", weights_only=True)
    ckpt["config"]["model"] = "vit_huge"  # the weights stay nano-sized; only the label changes
    del ckpt["args"]["views"]  # as in heads saved before init_head.py had --views
    torch.save(ckpt, tmp_path / "head_h.pt")
    r = run("contrastive_tune.py", "--init_from", tmp_path / "head_h.pt", "--dataset", "synthetic", "--batch_size", "64",
            "--max_steps", "1", "--out_dir", tmp_path / "ct", "--device", "cpu", "--topk", "3")
    assert r.returncode == 0, r.stderr[-2000:]
    args = torch.load(tmp_path / "ct" / "ckpt.pt", weights_only=True)["args"]
    assert (args["temperature"], args["target_ema"], args["epochs"], args["warmup_epochs"]) == (0.3, 0.995, 30, 6.0)
    assert (args["views"], args["head_blr"]) == ("minimal", 1e-4)  # such a head was trained on crop + flip
    # a head trained on the colour views (init_head.py --views aug) is tuned as MAE-CT_aug, with its settings
    ckpt["args"]["views"], ckpt["config"]["model"] = "aug", "vit_base"
    torch.save(ckpt, tmp_path / "head_aug.pt")
    r = run("contrastive_tune.py", "--init_from", tmp_path / "head_aug.pt", "--dataset", "synthetic", "--batch_size",
            "64", "--max_steps", "1", "--out_dir", tmp_path / "ct_aug", "--device", "cpu", "--topk", "3")
    assert r.returncode == 0, r.stderr[-2000:]
    args = torch.load(tmp_path / "ct_aug" / "ckpt.pt", weights_only=True)["args"]
    assert (args["views"], args["head_blr"], args["epochs"], args["topk"]) == ("aug", 5e-4, 80, 3)  # --topk given wins
    groups = torch.load(tmp_path / "ct_aug" / "ckpt.pt", weights_only=True)["optimizer"]["param_groups"]
    assert all(tuple(g["betas"]) == (0.9, 0.95) for g in groups)  # the authors' stage-3 AdamW


def test_stage2_follows_the_authors_optimiser_init_and_views(chain, tmp_path):
    """As the authors' stage-2 configs: AdamW betas (0.9, 0.95), the head at PyTorch's default init (not the MAE's
    Xavier), and the views the flag names (--views aug: the BYOL colour views, for MAE-CT_aug)."""
    losses = {}
    for name, views in [("a", "minimal"), ("b", "minimal"), ("c", "aug")]:
        r = run("init_head.py", "--init_from", chain / "mae.pt", "--dataset", "synthetic", "--batch_size", "64",
                "--max_steps", "1", "--log_every", "1", "--out_dir", tmp_path / name, "--device", "cpu", "--views",
                views, *SMALL_HEAD)
        assert r.returncode == 0, r.stderr[-2000:]
        losses[name] = json.loads((tmp_path / name / "log.jsonl").read_text().splitlines()[0])["loss"]
        ckpt = torch.load(tmp_path / name / "ckpt.pt", weights_only=True)
        assert ckpt["args"]["views"] == views
        assert all(tuple(g["betas"]) == (0.9, 0.95) and g["eps"] == 1e-8 for g in ckpt["optimizer"]["param_groups"])
        assert (ckpt["args"]["epochs"], ckpt["args"]["warmup_epochs"]) == (20, pytest.approx(4.0))  # 20% warm-up
    # the same seed replays the same views; the colour views give another first loss
    assert losses["a"] == losses["b"] != losses["c"]
    # torch's Linear init draws from U(+-1/sqrt(fan_in)); Xavier's bound for the predictor's last layer (32 -> 16)
    # would be sqrt(6 / 48) = 0.35, twice as wide. One step at lr ~1e-5 moves no weight by more than ~1e-4.
    w = ckpt["model"]["head.predictor.3.weight"]  # Linear(32 -> 16): the last of Linear, BN, ReLU, Linear
    assert w.shape == (16, 32) and 0.8 / 32 ** 0.5 < w.abs().max() < 1 / 32 ** 0.5 + 1e-3


def test_stage3_continues_the_heads_queue(chain, tmp_path):
    r = run("init_head.py", "--init_from", chain / "mae.pt", "--dataset", "synthetic", "--batch_size", "64",
            "--max_steps", "1", "--queue_size", "128", "--out_dir", tmp_path / "head", "--device", "cpu", *SMALL_HEAD)
    assert r.returncode == 0, r.stderr[-2000:]
    r = ct(chain, tmp_path / "ct", "--init_from", tmp_path / "head" / "ckpt.pt", "--max_steps", "1")
    assert r.returncode == 0 and "empty queue" not in r.stdout, r.stderr[-2000:]
    assert torch.load(tmp_path / "ct" / "ckpt.pt", weights_only=True)["args"]["queue_size"] == 128
    r = ct(chain, tmp_path / "ct96", "--init_from", tmp_path / "head" / "ckpt.pt", "--batch_size", "96")
    assert_refused(r, tmp_path / "ct96", "the stage-2 head's queue (128) is not a multiple of --batch_size 96")


def test_two_ranks_enqueue_the_global_batch_in_rank_order(needs_torchrun, chain, tmp_path):
    """Stages 2 and 3 under torchrun --nproc_per_node=2: each step enqueues the whole global batch, both ranks'
    halves gathered in rank order (the queue the lookup searches is the same on every rank), not the saving rank's
    half alone. Checked against the sampler's shards: stage 2 fills slots 0-127 in two steps, then stage 3, which
    keeps the head's queue, writes its first step into slots 128-191."""
    import data
    n = data.SYNTHETIC_SIZES["train"]
    shard = lambda rank: data._shard_indices(n, 32, 2, rank, 0, 0, True, True)  # seed 0, epoch 0; 32 a rank a step
    step = lambda s: torch.cat([shard(r)[32 * s:32 * (s + 1)] for r in (0, 1)])  # global batch s, rank order
    flags = ["--dataset", "synthetic", "--batch_size", "64", "--device", "cpu", "--compile", "0", "--num_workers", "0"]
    r = run_torchrun("init_head.py", "--init_from", chain / "mae.pt", *flags, *SMALL_HEAD, "--queue_size", "256",
                     "--max_steps", "2", "--out_dir", tmp_path / "head", timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    q = torch.load(tmp_path / "head" / "ckpt.pt", weights_only=True)["model"]
    assert int(q["queue.ptr"]) == 128 and (q["queue.indices"][128:] == -1).all()
    assert torch.equal(q["queue.indices"][:128], torch.cat([step(0), step(1)]))
    assert torch.allclose(q["queue.embeddings"][:128].norm(dim=1), torch.ones(128), atol=1e-5)
    r = run_torchrun("contrastive_tune.py", "--init_from", tmp_path / "head" / "ckpt.pt", *flags, "--topk", "3",
                     "--max_steps", "1", "--out_dir", tmp_path / "ct", timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    q3 = torch.load(tmp_path / "ct" / "ckpt.pt", weights_only=True)["model"]
    assert int(q3["queue.ptr"]) == 192 and torch.equal(q3["queue.indices"][128:192], step(0))
    assert torch.equal(q3["queue.embeddings"][:128], q["queue.embeddings"][:128])  # the head's entries kept
    new = q3["queue.embeddings"][128:192]
    assert not torch.allclose(new[:32], new[32:], atol=1e-3)  # rank 1's half is its own, not rank 0's twice


def test_stage3_resume_equals_uninterrupted(chain, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    ema = ["--encoder_ema", "0.9", "--save_every", "2"]
    assert ct(chain, a, "--max_steps", "4", *ema).returncode == 0
    assert ct(chain, b, "--max_steps", "2", *ema).returncode == 0
    with open(b / "log.jsonl", "a") as f:  # as if killed after logging step 3, in the middle of a line
        f.write('{"step": 3, "loss": 1.0}\n{"step": 4, "lo')
    r = ct(chain, b, "--max_steps", "4", "--resume", *ema)
    assert r.returncode == 0 and "resumed" in r.stdout, r.stderr[-2000:]
    assert "note: with --encoder_ema 0.9 over 4 steps, 66% of the EMA encoder is still the stage-2" in r.stdout
    ca, cb = (torch.load(x / "ckpt.pt", weights_only=True) for x in (a, b))
    assert ca["step"] == cb["step"] == 4
    for part in ("model", "encoder_ema"):
        for k in ca[part]:
            assert torch.equal(ca[part][k], cb[part][k]), (part, k)
    sa, sb = ca["optimizer"]["state"], cb["optimizer"]["state"]
    assert all(torch.equal(sa[i][n], sb[i][n]) for i in sa for n in sa[i])
    log_steps = lambda d: [json.loads(line)["step"] for line in (d / "log.jsonl").read_text().splitlines()]
    assert log_steps(b) == [2, 4]  # the lines after the checkpoint's step are dropped on resume, not repeated
    r = ct(chain, b, "--max_steps", "6", "--resume")  # without the EMA it was saved with: refused, not dropped
    assert r.returncode == 2 and "was trained with --encoder_ema; resume it with the EMA on or off as it was" in r.stderr
    assert ct(chain, b, "--max_steps", "1").returncode == 0  # a fresh run (no --resume) into the same folder
    assert log_steps(b) == [1]  # starts a new log
    r = ct(chain, b, "--max_steps", "2", "--resume", *ema)  # an EMA that the checkpoint does not hold: refused
    assert r.returncode == 2 and "was not trained with --encoder_ema" in r.stderr


def test_stages_2_and_3_take_the_data_of_their_input_checkpoint(chain, tmp_path):
    """Without --dataset, stage 2 trains on the MAE's data and stage 3 on the head's (not the flag default,
    synthetic, which fits any 32-px RGB encoder); stage 3 on other images than the head's starts with an empty
    queue, since the head's holds those images' indices; a file that does not say its data needs --dataset."""
    from PIL import Image
    import numpy as np
    rng = np.random.default_rng(0)
    root = tmp_path / "folder"
    for split, n in (("train", 40), ("val", 8)):
        for c in ("a", "b"):
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / split / c / f"{i}.png")
    ck = torch.load(chain / "mae.pt", weights_only=True)
    common.save_checkpoint(str(tmp_path / "mae.pt"), **{**ck, "args": {"dataset": "imagefolder", "data_path": str(root)}})
    small = ["--device", "cpu", "--batch_size", "16", "--num_workers", "0", "--warmup_epochs", "0.1"]
    head = tmp_path / "head"
    r = run("init_head.py", "--init_from", tmp_path / "mae.pt", *small, *SMALL_HEAD, "--queue_size", "32",
            "--max_steps", "2", "--out_dir", head)
    assert r.returncode == 0, r.stderr[-2000:]
    h = torch.load(head / "ckpt.pt", weights_only=True)
    assert (h["args"]["dataset"], h["args"]["data_path"]) == ("imagefolder", str(root))
    assert h["model"]["queue.indices"].max() < 80  # indices of the 80 folder images
    r = run("contrastive_tune.py", "--init_from", head / "ckpt.pt", *small, "--topk", "3", "--max_steps", "1",
            "--out_dir", tmp_path / "ct")
    assert r.returncode == 0 and "empty queue" not in r.stdout, r.stderr[-2000:]
    c = torch.load(tmp_path / "ct" / "ckpt.pt", weights_only=True)
    assert (c["args"]["dataset"], c["args"]["data_path"]) == ("imagefolder", str(root))
    assert (c["model"]["queue.indices"] >= 0).sum() == 32  # the head's queue, kept and refreshed
    r = run("contrastive_tune.py", "--init_from", head / "ckpt.pt", "--data_path", f"{root}/", *small, "--topk", "3",
            "--max_steps", "1", "--out_dir", tmp_path / "ct1")  # the same folder, spelled otherwise
    assert r.returncode == 0 and "empty queue" not in r.stdout, r.stderr[-2000:]
    for other in (["--dataset", "synthetic"], ["--dataset", "imagefolder", "--data_path", tmp_path / "elsewhere"]):
        if "elsewhere" in str(other[-1]):
            shutil.copytree(root, tmp_path / "elsewhere")
        r = run("contrastive_tune.py", "--init_from", head / "ckpt.pt", *other, *small, "--topk", "3",
                "--max_steps", "1", "--out_dir", tmp_path / "ct2")
        assert r.returncode == 0 and "other images than the head's: starting with an empty queue" in r.stdout, r.stderr[-2000:]
        c = torch.load(tmp_path / "ct2" / "ckpt.pt", weights_only=True)
        assert (c["model"]["queue.indices"] >= 0).sum() == 16  # only this run's one batch
    r = ct(chain, tmp_path / "ct3", "--seed", "1", "--max_steps", "1")  # generated images: another seed, others
    assert r.returncode == 0 and "other images than the head's" in r.stdout, r.stderr[-2000:]
    torch.save({"model": encoder_only(ck["model"])}, tmp_path / "official.pth")
    r = run("init_head.py", "--init_from", tmp_path / "official.pth", *small, "--out_dir", tmp_path / "h2")
    assert_refused(r, tmp_path / "h2", "does not say what it was trained on: pass --dataset")


def test_stages_2_and_3_resume_only_with_the_settings_they_were_trained_with(chain, tmp_path):
    """As stage 1 (tests/test_pretrain.py): a setting of what is trained refused at --resume, an optimiser one taken."""
    out = tmp_path / "ct"
    assert ct(chain, out, "--max_steps", "1").returncode == 0
    r = ct(chain, out, "--max_steps", "2", "--resume", "--topk", "5")
    assert r.returncode == 2 and "was trained with --topk 3 (now 5)" in r.stderr, r.stderr[-2000:]
    r = ct(chain, out, "--max_steps", "2", "--resume", "--layer_decay", "0.5")
    assert r.returncode == 0 and torch.load(out / "ckpt.pt", weights_only=True)["step"] == 2, r.stderr[-2000:]
    head = ["--init_from", chain / "mae.pt", *SMALL_HEAD, "--dataset", "synthetic", "--device", "cpu", "--batch_size",
            "64", "--out_dir", tmp_path / "h"]
    assert run("init_head.py", *head, "--max_steps", "1").returncode == 0
    r = run("init_head.py", *head, "--max_steps", "2", "--resume", "--temperature", "0.2")
    assert r.returncode == 2 and "was trained with --temperature 0.15 (now 0.2)" in r.stderr, r.stderr[-2000:]


def encoder_only(mae_sd):
    return {k: v for k, v in mae_sd.items() if not k.startswith("decoder") and k != "mask_token"}


def test_official_mae_file_is_accepted_by_init_head(tmp_path):
    cfg = model_config("vit_nano", 32, 4, 3)
    sd = init_weights(MaskedAutoencoder(**cfg)).state_dict()
    torch.save({"model": encoder_only(sd)}, tmp_path / "mae_pretrain_vit_nano.pth")  # the official layout: {"model": sd}
    r = run("init_head.py", "--init_from", tmp_path / "mae_pretrain_vit_nano.pth", "--dataset", "synthetic",
            "--batch_size", "64", "--max_steps", "2", "--out_dir", tmp_path / "h", "--device", "cpu", *SMALL_HEAD)
    assert r.returncode == 0, r.stderr[-2000:]
    assert torch.load(tmp_path / "h" / "ckpt.pt", weights_only=True)["config"] == cfg  # heads: the preset's
    # a file trained with another head count: --num_heads, recorded in the stage-2 checkpoint for stage 3
    r = run("init_head.py", "--init_from", tmp_path / "mae_pretrain_vit_nano.pth", "--dataset", "synthetic",
            "--batch_size", "64", "--max_steps", "1", "--out_dir", tmp_path / "h2", "--device", "cpu",
            "--num_heads", "2", *SMALL_HEAD)
    assert r.returncode == 0, r.stderr[-2000:]
    assert torch.load(tmp_path / "h2" / "ckpt.pt", weights_only=True)["config"] == dict(cfg, num_heads=2)
    # the MAE-CT authors' layout (mae_reimpl_base16.th): their config names the head count, no flag needed
    authors = dict(encoder_only(sd), pos_embed=sd["pos_embed"][:, 1:])  # their pos_embed has no CLS row
    torch.save({"state_dict": authors, "ctor_kwargs": {"kind": "vit.masked_encoder", "attention_heads": 2}},
               tmp_path / "mae_reimpl_nano4.th")
    r = run("init_head.py", "--init_from", tmp_path / "mae_reimpl_nano4.th", "--dataset", "synthetic",
            "--batch_size", "64", "--max_steps", "1", "--out_dir", tmp_path / "h3", "--device", "cpu", *SMALL_HEAD)
    assert r.returncode == 0, r.stderr[-2000:]
    h3 = torch.load(tmp_path / "h3" / "ckpt.pt", weights_only=True)
    assert h3["config"] == dict(cfg, num_heads=2)
    assert torch.equal(h3["model"]["encoder.pos_embed"], sd["pos_embed"])  # the CLS row put back in front


def assert_refused(r, out, text):
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    lines = [l for l in r.stderr.strip().splitlines() if l.strip()]
    assert lines[-1].startswith("error:") and text in lines[-1], lines[-3:]
    assert not (Path(out) / "ckpt.pt").exists()


def test_bad_input(chain, tmp_path):
    out = tmp_path / "o"
    assert_refused(run("contrastive_tune.py", "--init_from", chain / "mae.pt", "--out_dir", out), out, "holds a stage-1 MAE checkpoint (pretrain_mae.py); this stage needs a stage-2")
    assert_refused(run("init_head.py", "--init_from", chain / "head" / "ckpt.pt", "--out_dir", out), out, "holds a stage-2 checkpoint (init_head.py); this stage needs a stage-1")
    bad = tmp_path / "corrupt.pt"
    bad.write_bytes((chain / "head" / "ckpt.pt").read_bytes()[:3000])
    assert_refused(run("contrastive_tune.py", "--init_from", bad, "--out_dir", out), out, "cannot read checkpoint")
    ck = torch.load(chain / "head" / "ckpt.pt", weights_only=True)
    ck["model"]["encoder.blocks.3.mlp.fc1.weight"] = torch.zeros(3, 3)
    torch.save(ck, tmp_path / "shapes.pt")
    assert_refused(ct(chain, out, "--init_from", tmp_path / "shapes.pt"), out, "wrong shape")
    assert_refused(ct(chain, out, "--topk", "100000"), out, "larger than the queue")
    assert_refused(ct(chain, out, "--batch_size", "8192", "--queue_size", "8192"), out,
                   "--batch_size 8192 is larger than the training set (5000 images)")
    assert_refused(run("init_head.py", *stage_args(chain, "init_head.py"), "--dataset", "synthetic", "--batch_size", "8192",
                       "--out_dir", out, "--device", "cpu"), out, "--batch_size 8192 is larger than the training set")
    assert_refused(ct(chain, out, "--queue_size", "100"), out, "not a multiple")
    assert_refused(ct(chain, out, "--crop_min", "0"), out, "--crop_min: 0 is not in (0, 1]")
    assert_refused(ct(chain, out, "--frozen_blocks", "4"), out, "--frozen_blocks must be in [0, 3]")  # all 4: only the head
    assert_refused(ct(chain, out, "--encoder_ema", "1"), out, "--encoder_ema: 1 is not in [0, 1)")
    assert_refused(ct(chain, out, "--target_ema", "-0.5"), out, "--target_ema: -0.5 is not in [0, 1)")
    assert_refused(ct(chain, out, "--pooling", "cls"), out, "--pooling cls differs from the stage-2 head")
    assert_refused(ct(chain, out, "--proj_dim", "64"), out, "--proj_dim 64 differs from the stage-2 head")
    assert_refused(run("contrastive_tune.py", "--init_from", tmp_path / "nope.pt", "--out_dir", out), out, "not found")
    for script in ["init_head.py", "contrastive_tune.py"]:  # as torchrun starts it: refused before any process group
        two = run(script, *stage_args(chain, script)[:2], "--compile_mode", "reduce-overhead", "--out_dir", out,
                  env={"WORLD_SIZE": "2"})
        assert_refused(two, out, "--compile_mode reduce-overhead is for one process")
    assert not torch.distributed.is_initialized()
    assert ct(chain, tmp_path / "ok", *SMALL_HEAD, "--pooling", "mean", "--max_steps", "1").returncode == 0  # the head's own


def test_lr_schedule_linear_warmup_then_half_cosine():
    peak, warmup, total = 2e-4, 10, 110
    at = lambda s: common.lr_at(s, total, warmup, peak)
    assert at(0) == 0 and at(5) == pytest.approx(peak / 2) and at(warmup) == pytest.approx(peak)
    assert at(60) == pytest.approx(peak / 2) and at(total) == pytest.approx(0, abs=1e-15) and at(total + 5) == at(total)
    assert all(at(s) >= at(s + 1) for s in range(warmup, total))


@pytest.mark.parametrize("script", ["init_head.py", "contrastive_tune.py"])
def test_peak_lr_counts_both_views(chain, tmp_path, script):
    """Stages 2-3: lr = blr * batch * 2 / 256 (the two views of each image count, as the authors'), reached at the
    end of the warm-up: 64 images a step, 78 steps an epoch, warm-up 0.1 epoch = 7 steps; step s runs at
    lr_at(s - 1), so the 8th logged step is the first at the peak."""
    r = run(script, *stage_args(chain, script), "--dataset", "synthetic", "--epochs", "1", "--batch_size", "64",
            "--warmup_epochs", "0.1", "--max_steps", "8", "--log_every", "1", "--out_dir", tmp_path, "--device", "cpu",
            "--blr", "3e-4")
    assert r.returncode == 0, r.stderr[-2000:]
    lrs = [json.loads(line)["lr"] for line in (tmp_path / "log.jsonl").read_text().splitlines() if '"lr"' in line]
    peak = 3e-4 * 64 * 2 / 256
    assert lrs == pytest.approx([peak * s / 7 for s in range(8)])


def test_resume_keeps_this_runs_group_settings_and_the_saved_moments():
    """A --layer_decay or --weight_decay changed at --resume takes effect (torch's load_state_dict alone would
    restore the saved ones); AdamW's moments and step counts come from the checkpoint."""
    w = torch.nn.Parameter(torch.ones(3, 3))
    old = common.adamw([dict(params=[w], weight_decay=0.05, lr_scale=0.65)], common.BETAS, torch.device("cpu"))
    w.grad = torch.ones(3, 3)
    common.set_lr(old, 1e-3)
    old.step()
    saved = old.state_dict()
    new = common.adamw([dict(params=[w], weight_decay=0.1, lr_scale=0.8)], common.BETAS, torch.device("cpu"))
    common.load_optimizer(new, saved)
    assert (new.param_groups[0]["weight_decay"], new.param_groups[0]["lr_scale"]) == (0.1, 0.8)
    assert torch.equal(new.state[w]["exp_avg"], old.state[w]["exp_avg"]) and int(new.state[w]["step"]) == 1


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_no_tf32(precision):
    """Under bf16 autocast the fp32 matmuls are the similarities kept in fp32 on purpose, and --precision fp32 asks
    for exact numbers: TF32 rounding in neither (torch's cuDNN default would allow it in convolutions)."""
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        args = argparse.Namespace(device="cpu", batch_size=8, warmup_epochs=1, precision=precision, compile=0, seed=0)
        common.setup(args)
        assert torch.backends.cuda.matmul.allow_tf32 is False and torch.backends.cudnn.allow_tf32 is False
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def test_similarities_and_loss_stay_fp32_under_bf16_autocast():
    # near ties: 8 entries close to each query (cosines ~1e-4 apart), which bf16 similarities order wrongly for
    # 10-16 of the 16 queries (seeds 0-19); the other half of the queue is random
    g = torch.Generator().manual_seed(0)
    z = F.normalize(torch.randn(16, 32, generator=g), dim=1)
    q = filled_queue(size=256, dim=32)
    q.embeddings[:128] = F.normalize(z.repeat(8, 1) + 0.01 * torch.randn(128, 32, generator=g), dim=1)
    idx = torch.full((16,), -5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, slots = q.lookup(z, idx, topk=1)
        loss = nnclr_loss(z, q.embeddings[:16], 0.1)
    assert torch.equal(slots, (z @ q.embeddings.T).argmax(dim=1))
    assert loss.dtype == torch.float32 and loss.item() == nnclr_loss(z, q.embeddings[:16], 0.1).item()


def test_every_stage_tells_its_loader_the_epoch(tmp_path, monkeypatch):
    """Each training loop passes the epoch to its loader, so every epoch draws a new permutation (a loop stuck at
    set_epoch(0) would show the images in the same order every epoch, and resume would still equal itself):
    256 generated images at batch 64 are 4 steps an epoch, so 9 steps run epochs 0, 1 and 2."""
    import data
    monkeypatch.setattr(data, "SYNTHETIC_SIZES", dict(train=256, val=64))
    epochs, real = [], data.ViewLoader.set_epoch

    def set_epoch(self, epoch, start_batch=0):  # records each epoch a loop asks for
        epochs.append(epoch)
        return real(self, epoch, start_batch)
    monkeypatch.setattr(data.ViewLoader, "set_epoch", set_epoch)
    run_args = ["--dataset", "synthetic", "--device", "cpu", "--batch_size", "64", "--epochs", "3", "--max_steps", "9"]
    for script, extra in [("pretrain_mae.py", ["--model", "vit_nano", "--pictures", "0"]),
                          ("init_head.py", ["--init_from", tmp_path / "pretrain_mae" / "ckpt.pt", *SMALL_HEAD]),
                          ("contrastive_tune.py", ["--init_from", tmp_path / "init_head" / "ckpt.pt", "--topk", "3"])]:
        epochs.clear()
        r = run(script, *run_args, *extra, "--out_dir", tmp_path / script[:-3])
        assert r.returncode == 0, r.stderr[-2000:]
        assert epochs == [0, 1, 2], (script, epochs)


@pytest.mark.parametrize("script", ["init_head.py", "contrastive_tune.py"])
def test_temperature_and_topk_reach_the_lookup_and_the_loss(chain, tmp_path, monkeypatch, script):
    """--temperature is what the NNCLR loss divides by and --topk how many neighbours the lookup draws from, in
    every call of every step (two lookups and two losses a step, one per view), not a default or a constant
    somewhere on the way: stage 3 with --topk 3, stage 2 always top-1 (the exact nearest neighbour)."""
    import model as model_module
    temps, topks = [], []
    real_loss, real_lookup = model_module.nnclr_loss, NNQueue.lookup

    def loss(nn_a, pred_b, temperature, *rest, **kw):
        temps.append(temperature)
        return real_loss(nn_a, pred_b, temperature, *rest, **kw)

    def lookup(self, z, idx, topk=1):
        topks.append(topk)
        return real_lookup(self, z, idx, topk)
    monkeypatch.setattr(model_module, "nnclr_loss", loss)
    monkeypatch.setattr(NNQueue, "lookup", lookup)
    r = run(script, *stage_args(chain, script), "--dataset", "synthetic", "--epochs", "1", "--batch_size", "64",
            "--max_steps", "2", "--warmup_epochs", "0.1", "--temperature", "0.37", "--out_dir", tmp_path, "--device", "cpu")
    assert r.returncode == 0, r.stderr[-2000:]
    assert temps == [0.37] * 4
    assert topks == [3 if script == "contrastive_tune.py" else 1] * 4


@pytest.mark.parametrize("script", ["pretrain_mae.py", "init_head.py", "contrastive_tune.py"])
def test_every_stage_reseeds_each_step_from_seed_rank_and_step(chain, tmp_path, monkeypatch, script):
    """Each step reseeds from (--seed, rank, step) before drawing its batch, crops, masks and top-k picks: a loop that
    passed a constant step would draw the same crops (and masks) every step, and resume would still equal itself."""
    calls, real = [], common.seed_step
    monkeypatch.setattr(common, "seed_step", lambda *a: calls.append(a) or real(*a))
    if script == "pretrain_mae.py":
        args = ["--model", "vit_nano", "--pictures", "0"]
    else:
        args = stage_args(chain, script)  # stage 3 from a head of seed 0: other generated images, an empty queue
    r = run(script, *args, "--dataset", "synthetic", "--epochs", "1", "--batch_size", "64", "--max_steps", "3",
            "--seed", "5", "--out_dir", tmp_path, "--device", "cpu")
    assert r.returncode == 0, r.stderr[-2000:]
    assert calls == [(5, 0, 0), (5, 0, 1), (5, 0, 2)]


def test_stage2_resume_equals_uninterrupted(chain, tmp_path):
    """As stages 1 and 3: 2 steps, then --resume to 4, end with the same head, queue, BN statistics, optimiser state
    and losses as 4 steps in one go (the queue and the data order continue where the checkpoint left them)."""
    a, b = tmp_path / "a", tmp_path / "b"
    head = [*stage_args(chain, "init_head.py"), "--dataset", "synthetic", "--epochs", "1", "--batch_size", "64",
            "--warmup_epochs", "0.1", "--log_every", "1", "--device", "cpu"]
    assert run("init_head.py", *head, "--max_steps", "4", "--save_every", "2", "--out_dir", a).returncode == 0
    assert run("init_head.py", *head, "--max_steps", "2", "--out_dir", b).returncode == 0
    r = run("init_head.py", *head, "--max_steps", "4", "--resume", "--out_dir", b)
    assert r.returncode == 0 and "resumed" in r.stdout, r.stderr[-2000:]
    ca, cb = (torch.load(x / "ckpt.pt", weights_only=True) for x in (a, b))
    assert ca["step"] == cb["step"] == 4
    assert_same_state(ca, cb)
    logs = [[json.loads(line) for line in (x / "log.jsonl").read_text().splitlines()] for x in (a, b)]
    assert [x["step"] for x in logs[1]] == [1, 2, 3, 4]
    assert [(x["loss"], x["nn_acc"]) for x in logs[0]] == [(x["loss"], x["nn_acc"]) for x in logs[1]]


def test_stage3_updates_both_emas_every_step_with_their_own_momentum(chain, tmp_path):
    """After each optimiser step: target projector <- 0.99 target + 0.01 online projector (--target_ema) and EMA
    encoder <- 0.9 EMA + 0.1 encoder (--encoder_ema 0.9), both starting from the stage-2 weights. Step 1's
    checkpoint is kept, then the run resumes to step 2 (resume equals an uninterrupted run, a test above)."""
    ema = ["--encoder_ema", "0.9", "--save_every", "1", "--warmup_epochs", "0", "--blr", "1e-2",
           "--head_blr", "1e-2"]  # steps that move the weights
    assert ct(chain, tmp_path, "--max_steps", "1", *ema).returncode == 0
    shutil.copy(tmp_path / "ckpt.pt", tmp_path / "step1.pt")
    assert ct(chain, tmp_path, "--max_steps", "2", "--resume", *ema).returncode == 0
    head = torch.load(chain / "head" / "ckpt.pt", weights_only=True)["model"]
    c1, c2 = (torch.load(tmp_path / f, weights_only=True) for f in ("step1.pt", "ckpt.pt"))
    assert (c1["step"], c2["step"]) == (1, 2)
    params = [k[len("head.projector."):] for k in head
              if k.startswith("head.projector.") and k.endswith(("weight", "bias"))]  # not BatchNorm's statistics
    start = {k: head["head.projector." + k] for k in params}
    for c in (c1, c2):
        online = {k: c["model"]["head.projector." + k] for k in params}
        expected = {k: 0.99 * start[k] + 0.01 * online[k] for k in params}
        assert all((online[k] - start[k]).abs().max() > 1e-3 for k in params)  # so a skipped update would show
        assert all(torch.allclose(c["model"]["target_projector." + k], expected[k], atol=1e-7) for k in params)
        start = {k: c["model"]["target_projector." + k] for k in params}
    enc = {k[len("encoder."):]: v for k, v in head.items() if k.startswith("encoder.")}
    moved = 0
    for c in (c1, c2):
        expected = {k: 0.9 * v + 0.1 * c["model"]["encoder." + k] for k, v in enc.items()}
        assert c["encoder_ema"].keys() == expected.keys()
        assert all(torch.allclose(c["encoder_ema"][k], expected[k], atol=1e-7) for k in expected)
        moved += sum(not torch.equal(c["encoder_ema"][k], enc[k]) for k in enc)
        enc = c["encoder_ema"]
    assert moved > 0  # the upper blocks trained, so the EMA moved


def test_head_layers_are_nnclrs():
    """Projector Linear-BN-ReLU, Linear-BN-ReLU, Linear-BN; predictor Linear-BN-ReLU, Linear (no BN at its end);
    no Linear has a bias (a BN follows, or NNCLR has none). The loss tests rebuild the loss from the head itself,
    so only this one pins its layout."""
    from model import NNCLRHead, SyncBatchNorm1d
    head = NNCLRHead(64, 32, 16, 48)
    L, B, R = torch.nn.Linear, SyncBatchNorm1d, torch.nn.ReLU
    assert [type(m) for m in head.projector] == [L, B, R, L, B, R, L, B]
    assert [type(m) for m in head.predictor] == [L, B, R, L]
    linears = [m for m in head.modules() if isinstance(m, L)]
    assert [(m.in_features, m.out_features) for m in linears] == [(64, 32), (32, 32), (32, 16), (16, 48), (48, 16)]
    assert all(m.bias is None for m in linears)


def test_empty_queue_slots_are_unit_vectors_of_no_image():
    q = NNQueue(32, 8)
    assert torch.allclose(q.embeddings.norm(dim=1), torch.ones(32)) and (q.indices == -1).all() and q.ptr == 0


def test_topk_draws_a_rank_for_each_query_on_its_own():
    """One lookup of 64 queries with top-5: the ranks drawn differ between queries (a single draw shared by the
    batch would make every positive the same rank). All five ranks occur; seeded, so it cannot flake."""
    torch.manual_seed(0)
    q = NNQueue(64, 8)
    z = F.normalize(torch.randn(64, 8), dim=1)
    idx = torch.full((64,), -5)
    torch.manual_seed(1)
    _, slots = q.lookup(z, idx, topk=5)
    top5 = (z @ q.embeddings.T).topk(5, dim=1).indices  # (64, 5)
    ranks = (top5 == slots[:, None]).float().argmax(dim=1)
    assert (top5 == slots[:, None]).any(dim=1).all() and set(ranks.tolist()) == set(range(5))
