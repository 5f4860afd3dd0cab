"""Benchmark: training-step throughput of each stage, feature extraction, and the real data path.

Times each stage's step (MAE, head init, contrastive tuning) and evaluate.py's feature extraction on synthetic
input, after warm-up and compilation, as the median over several timed runs (CUDA events on GPU). Prints img/s,
step ms, GFLOP per image and MFU (FLOPs counted with torch.utils.flop_counter on an eager copy of the step,
against a matmul rate measured in the same run) and peak memory. `--end_to_end` adds the real path (in-memory
dataset + batched augmentation + step) on a dataset, for the MAE step and, with ct in --stages, for stage 3.
`--baseline` adds an MAE built from timm's Block, trained as facebookresearch/mae ships it (timm 0.3.2's attention,
written out rather than fused; fp16 autocast with a GradScaler that unscales for the gradient norm it logs; torch's
default AdamW, eager, loss.item() and a synchronize every step), and the same model with today's timm (fused
attention) in bf16 compiled, so the ratio to the official recipe is measured on the same card in the same run.
Feature extraction runs eager, as evaluate.py does.

    python bench.py --device cpu         # CPU, CI-sized: vit_nano at 32 px
    python bench.py --device cuda --model vit_base --img_size 224 --patch_size 16 --batch_size 256 --baseline
    python bench.py --device cuda --model vit_tiny --batch_size 1024 --end_to_end cifar10 --data_path data/

Numbers measured so far are in BENCHMARKS.md.
"""
import argparse
import contextlib
import itertools
import json
import statistics
import sys
import time

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import common
import data
from contrastive_tune import PAPER
from model import MAECT, PRESETS, MaskedAutoencoder, init_weights, model_config

p = common.ArgumentParser(__doc__)
p.add_argument("--model", default="vit_nano", choices=list(PRESETS), help="size preset (model.PRESETS)")
p.add_argument("--img_size", type=common.POSITIVE_INT, default=32, help="input side in pixels")
p.add_argument("--patch_size", type=common.POSITIVE_INT, default=4, help="patch side")
p.add_argument("--batch_size", type=common.POSITIVE_INT, default=64, help="images per step")
p.add_argument("--stages", default="mae,head,ct,features", help="comma list of mae, head, ct, features")
p.add_argument("--steps", type=common.POSITIVE_INT, default=10, help="steps per timed run")
p.add_argument("--runs", type=common.POSITIVE_INT, default=5, help="timed runs; the median is reported")
p.add_argument("--warmup", type=common.COUNT, default=3, help="untimed steps first (compilation happens here)")
p.add_argument("--compile", type=int, default=None, choices=[0, 1], help="torch.compile (default: on for CUDA)")
p.add_argument("--compile_mode", default=None, choices=["default", "reduce-overhead", "max-autotune-no-cudagraphs"],
               help="torch.compile mode of our steps, the official model's compiled step and the end-to-end run "
                    "(reduce-overhead = CUDA graphs; for the head and ct stages it compiles their whole forward as one "
                    "graph, as the stage scripts do with --compile_mode reduce-overhead)")
p.add_argument("--precision", default=None, choices=["bf16", "fp32"], help="autocast dtype (default: bf16 on CUDA)")
p.add_argument("--queue_size", type=common.POSITIVE_INT, default=65536, help="NNCLR queue length for the head/ct stages")
p.add_argument("--baseline", action="store_true", help="also time an MAE from timm blocks with the official recipe (needs timm)")
p.add_argument("--end_to_end", default=None,
               help="dataset for end-to-end runs through data.ViewLoader (e.g. synthetic): the MAE step (mae in --stages) "
                    "and stage 3 (ct in --stages)")
p.add_argument("--data_path", default=None, help="dataset root for --end_to_end")
p.add_argument("--ct_views", default="minimal", choices=["minimal", "aug"],
               help="views of stage 3's end-to-end run: minimal (crop + flip, MAE-CT) or aug (plus the BYOL colour "
                    "pipeline, MAE-CT_aug)")
p.add_argument("--profile", action="store_true", help="print the top operators (torch.profiler) of the first variant's step")
p.add_argument("--json", default=None, help="also write the rows to this file")
p.add_argument("--device", default=None, help="cuda | cpu (default: cuda when available)")
args = p.parse_args()
args.seed = 0
STAGES = ("mae", "head", "ct", "features")
stages = args.stages.split(",")
try:  # bad input: one error line, exit 2, as the stage scripts
    if not set(stages) <= set(STAGES):
        raise common.UserError(f"--stages {args.stages}: choose from {', '.join(STAGES)}")
    if args.end_to_end:
        data.check_dataset(args.end_to_end)
    proc = common.setup(args)  # sets compile/precision defaults from the device
    cfg = model_config(args.model, args.img_size, args.patch_size, 3)
except (common.UserError, data.DataError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
dev, cuda = proc.device, proc.device.type == "cuda"
B = args.batch_size


def sync():
    if cuda:
        torch.cuda.synchronize()


def peak_rate():
    """Measured matmul rate (FLOP/s) of this device in the autocast dtype: the MFU denominator."""
    n = 8192 if cuda else 1024
    dt = proc.dtype if cuda else torch.float32
    a, b = torch.randn(n, n, device=dev, dtype=dt), torch.randn(n, n, device=dev, dtype=dt)
    for _ in range(3):
        a @ b
    sync()
    times = []
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(10):
            a @ b
        sync()
        times.append((time.perf_counter() - t) / 10)
    return 2 * n ** 3 / statistics.median(times)


def time_step(step_fn):
    """Median seconds per step over args.runs runs of args.steps steps, after args.warmup steps."""
    for _ in range(args.warmup):
        step_fn()
    sync()
    times = []
    for _ in range(args.runs):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(args.steps):
                step_fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1000 / args.steps)
        else:
            t = time.perf_counter()
            for _ in range(args.steps):
                step_fn()
            times.append((time.perf_counter() - t) / args.steps)
    return statistics.median(times)


def profile(step_fn):
    """Where a step's time goes: operators by device time (and host time, which shows launch overhead)."""
    from torch.profiler import ProfilerActivity, profile as prof
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with prof(activities=acts) as pr:
        for _ in range(5):
            step_fn()
        sync()
    key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    proc.print(pr.key_averages().table(sort_by=key, row_limit=25, max_name_column_width=60))


def count_flops(step_fn):
    # The counter knows the GPU's fused attention kernels but not the CPU's: there attention runs as the math
    # backend, whose matmuls it counts (the same FLOPs), or it would count attention as free.
    math_attention = contextlib.nullcontext() if cuda else sdpa_kernel(SDPBackend.MATH)
    with math_attention, FlopCounterMode(display=False) as fc:
        step_fn()
    return fc.get_total_flops()


def images():
    return torch.randn(B, 3, args.img_size, args.img_size, device=dev)


# ---------------------------------------------------------------- the steps, as the stage scripts take them
def mae_step(model, opt, autocast, scaler=None, official_sync=False, official=False):
    x = images()
    L = model.grid ** 2
    params = list(model.parameters())

    def step():
        noise = None if official else torch.rand(B, L, device=dev)  # masks drawn eagerly, as pretrain_mae.py does
        with autocast():
            loss, _, _ = model(x, mask_ratio=0.75, noise=noise)
        opt.zero_grad(set_to_none=True)
        if scaler is None:
            loss.backward()
            opt.step()
        else:  # the official recipe: fp16 with loss scaling; its scaler unscales to compute the gradient norm it logs
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            torch.stack([q.grad.detach().norm() for q in params if q.grad is not None]).norm()
            scaler.step(opt)
            scaler.update()
        if official_sync:  # the official loop reads the loss and synchronises every step
            loss.item()
            torch.cuda.synchronize() if cuda else None
    return step


def build_mae(blocks_from_timm=False, fused_attention=True):
    model = MaskedAutoencoder(**cfg)
    if blocks_from_timm:  # the official models_mae.py builds its blocks from timm
        from functools import partial
        from timm.models.vision_transformer import Block
        ln = partial(torch.nn.LayerNorm, eps=1e-6)
        model.blocks = torch.nn.ModuleList(Block(cfg["embed_dim"], cfg["num_heads"], 4.0, qkv_bias=True, norm_layer=ln)
                                           for _ in range(cfg["depth"]))
        model.decoder_blocks = torch.nn.ModuleList(Block(cfg["decoder_embed_dim"], cfg["decoder_num_heads"], 4.0,
                                                         qkv_bias=True, norm_layer=ln) for _ in range(cfg["decoder_depth"]))
        for block in (*model.blocks, *model.decoder_blocks):  # timm 0.3.2, which MAE pins: q @ k^T, softmax, @ v
            block.attn.fused_attn = fused_attention
    return init_weights(model).to(dev)


def nnclr_step(stage, compile=True, batches=None, cfg=cfg, topk=20):
    """One step of init_head.py (stage 'head': whole encoder frozen, top-1) or contrastive_tune.py ('ct', top-k), on
    one fixed synthetic batch, or on the next (idx, [view0, view1]) of `batches` (the real data path)."""
    model = MAECT(cfg, args.queue_size, cfg["pooling"], target=stage == "ct")
    init_weights(model)
    depth = cfg["depth"]
    frozen = depth if stage == "head" else depth // 2
    model.encoder.freeze(frozen)
    model.to(dev).train()
    if stage == "ct":
        from contrastive_tune import param_groups
        ns = argparse.Namespace(frozen_blocks=frozen, layer_decay=0.65, weight_decay=0.05, head_weight_decay=1e-5,
                                head_blr=1e-4, blr=1e-4)
        groups = param_groups(model, ns)
    else:
        groups = common.decay_groups(model.head.named_parameters(), 1e-5)
    opt = common.adamw(groups, common.BETAS, dev)
    common.set_lr(opt, 1e-4)
    fwd = common.compile_nnclr(model, args.compile_mode or "default") if args.compile and compile else model  # as the scripts
    batches = batches or itertools.repeat((torch.arange(B, device=dev), [images(), images()]))

    def step():
        idx, views = next(batches)
        with proc.autocast():
            loss, z0, _ = fwd(views, idx, 0.15, 1 if stage == "head" else topk)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if stage == "ct":
            common.ema_update(model.target_projector, model.head.projector, 0.99)
        model.queue.enqueue(z0, idx)
    return step


def features_step():
    """evaluate.py's forward: the whole encoder, no masking, eager (evaluate.py does not compile: one pass)."""
    enc = MaskedAutoencoder(**cfg).to(dev).eval()
    fwd = enc.forward_features
    x = images()

    @torch.no_grad()
    def step():
        with proc.autocast():
            fwd(x)
    return step


def endless(loader):
    """(idx, views) batches of a data.ViewLoader, epoch after epoch."""
    for epoch in itertools.count():
        loader.set_epoch(epoch)
        for idx, views, _ in loader:
            yield idx, views


def e2e_step(stage="mae"):
    """Steps fed by the real data path: in-memory dataset on the device, batched crop+flip (two views for stage 3,
    with colour too for --ct_views aug), then the MAE step (stage 'mae') or the contrastive-tuning step ('ct')."""
    train = data.load_split(args.end_to_end, args.data_path, "train", args.img_size, None, 0)
    cfg_e = model_config(args.model, args.img_size, args.patch_size, train.channels)
    views = "mae" if stage == "mae" else args.ct_views
    batches = endless(data.ViewLoader(train, B, views, 1 if stage == "mae" else 2, args.img_size, dev, num_workers=8))
    if stage == "ct":
        return nnclr_step("ct", batches=batches, cfg=cfg_e, topk=PAPER[args.ct_views]["topk"])
    model = init_weights(MaskedAutoencoder(**cfg_e)).to(dev)
    opt = common.adamw(common.decay_groups(model.named_parameters(), 0.05), common.BETAS, dev)
    common.set_lr(opt, 1e-4)
    fwd = torch.compile(model, mode=args.compile_mode) if args.compile else model

    def step():
        _, (x,) = next(batches)
        noise = torch.rand(B, model.grid ** 2, device=dev)
        with proc.autocast():
            loss, _, _ = fwd(x, mask_ratio=0.75, noise=noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


# ---------------------------------------------------------------- run
rows, failed = [], []
rate = peak_rate()
proc.print(f"device {torch.cuda.get_device_name() if cuda else 'cpu'}, torch {torch.__version__}, "
           f"measured matmul {rate / 1e12:.1f} TFLOP/s ({'bf16' if cuda and proc.dtype == torch.bfloat16 else 'fp32'})")


def bench(name, make, flops_make=None):
    torch._dynamo.reset()  # each stage compiles afresh: no stage inherits another's guards (e.g. top-k as a dynamic int)
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    try:
        step = make()
        sec = time_step(step)
        if args.profile and not rows:
            profile(step)
    except Exception as e:  # one broken variant should not hide the others' numbers (the exit code says it)
        proc.print(f"{name}: FAILED {type(e).__name__}: {str(e).splitlines()[0][:200]}")
        failed.append(name)
        return
    peak = round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None  # before the eager copy below
    flops = None
    if flops_make is not False:
        del step
        try:
            flops = count_flops((flops_make or make)())
        except Exception as e:  # e.g. out of memory for the eager copy: keep the timing
            proc.print(f"{name}: FLOPs not counted: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
    row = dict(name=name, model=args.model, img=args.img_size, batch=B, img_s=round(B / sec, 1), step_ms=round(sec * 1e3, 2),
               gflop_img=round(flops / B / 1e9, 3) if flops else None, mfu=round(flops / sec / rate, 3) if flops else None,
               peak_gib=peak)
    rows.append(row)
    proc.print(json.dumps(row))


def eager_mae():  # flop counting needs an uncompiled copy of the same step
    model = build_mae()
    opt = common.adamw(common.decay_groups(model.named_parameters(), 0.05), common.BETAS, dev)
    common.set_lr(opt, 1e-4)
    return mae_step(model, opt, proc.autocast)


mode = f", {args.compile_mode}" if args.compile and args.compile_mode else ""
if "mae" in stages:
    def ours():
        model = build_mae()
        opt = common.adamw(common.decay_groups(model.named_parameters(), 0.05), common.BETAS, dev)
        common.set_lr(opt, 1e-4)  # as the official row's: the weights change every step
        return mae_step(torch.compile(model, mode=args.compile_mode) if args.compile else model, opt, proc.autocast)
    bench("mae (ours)" + mode, ours, eager_mae)
if "head" in stages:
    bench("head init (ours)" + mode, lambda: nnclr_step("head"), lambda: nnclr_step("head", compile=False))
if "ct" in stages:
    bench("contrastive tuning (ours)" + mode, lambda: nnclr_step("ct"), lambda: nnclr_step("ct", compile=False))
if "features" in stages:
    bench("feature extraction (ours, eager as evaluate.py)", features_step)
if args.baseline:
    def official(compiled):  # compiled: today's timm (fused attention); as shipped: timm 0.3.2's written-out attention
        model = build_mae(blocks_from_timm=True, fused_attention=compiled)
        opt = torch.optim.AdamW(common.decay_groups(model.named_parameters(), 0.05), lr=1e-4, betas=(0.9, 0.95))
        if compiled:  # the same code with bf16 autocast and torch.compile, in our mode: like is compared with like
            return mae_step(torch.compile(model, mode=args.compile_mode), opt, proc.autocast, official=True)
        fp16 = lambda: torch.autocast(dev.type, dtype=torch.float16 if cuda else torch.bfloat16)
        return mae_step(model, opt, fp16, torch.amp.GradScaler(dev.type, enabled=cuda), official_sync=True, official=True)
    bench("mae, official recipe as shipped (timm 0.3.2 attention, fp16, grad norm, eager)", lambda: official(False),
          eager_mae)
    if args.compile:
        bench("mae, official model bf16 + compile (fused attention)" + mode, lambda: official(True), eager_mae)
if args.end_to_end and "mae" in stages:
    bench(f"mae end-to-end on {args.end_to_end} (loader + aug + step){mode}", e2e_step, False)
if args.end_to_end and "ct" in stages:
    bench(f"contrastive tuning end-to-end on {args.end_to_end} (two {args.ct_views} views + step){mode}",
          lambda: e2e_step("ct"), False)

proc.print("\n| stage | model | img | batch | img/s | step ms | GFLOP/img | MFU | peak GiB |\n|---|---|---|---|---|---|---|---|---|")
dash = lambda v: "-" if v is None else v
for r in rows:
    proc.print(f"| {r['name']} | {r['model']} | {r['img']} | {r['batch']} | {r['img_s']:,.0f} | {r['step_ms']} | "
               f"{dash(r['gflop_img'])} | {dash(r['mfu'])} | {dash(r['peak_gib'])} |")
if args.json:
    with open(args.json, "w") as f:
        json.dump(dict(device=torch.cuda.get_device_name() if cuda else "cpu", torch=torch.__version__,
                       matmul_tflops=rate / 1e12, rows=rows), f, indent=1)
if failed:
    proc.print(f"error: {len(failed)} variant(s) failed: {'; '.join(failed)}")
    sys.exit(1)
