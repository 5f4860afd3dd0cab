"""What every stage script shares: flags, process setup (DDP/AMP/seeding), schedules, checkpoints, logging.

Kept small on purpose: a stage script should still read top to bottom without jumping here often.
"""
import argparse
import contextlib
import gc
import json
import math
import os
import re
import sys
import threading
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist


class UserError(Exception):
    """Bad input from the user: printed as one `error: ...` line, exit code 2, nothing written."""


def _say_error(message):
    """One `error:` line on stderr. Under torchrun, an error met before the process group exists (a flag, a
    checkpoint: the same for every process of a node) is said by each node's first process, not once per process."""
    if dist.is_initialized() or int(os.environ.get("LOCAL_RANK", 0)) == 0:
        print(f"error: {message}", file=sys.stderr)


def main_guard(main):
    """Run `main`, turning a UserError (or a data error) into one clear line and a non-zero exit."""
    try:
        main()
        finish_saves()
    except UserError as e:
        _say_error(e)
        sys.exit(2)
    except Exception as e:  # data.DataError shares the contract without importing this module
        if type(e).__name__ != "DataError":
            raise
        msg = str(e).strip()
        if "Original Traceback" in msg:  # re-raised from a DataLoader worker: keep the original message only
            msg = msg.splitlines()[-1].split(": ", 1)[-1]
        _say_error(msg)
        sys.exit(2)
    finally:
        try:  # main stopped while a checkpoint was being written: let it finish, and say if it failed
            finish_saves()
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
        if dist.is_initialized():
            # DDP's reducer and the last autograd graph sit in reference cycles; left to the collector at
            # interpreter exit they are freed after the process group is gone, and a gloo rank then aborts
            # ("terminate called without an active exception") in 1 of 5 to 10 CPU runs. Collect them first.
            gc.collect()
            dist.destroy_process_group()


# ---------------------------------------------------------------- flags shared by every stage
class ArgumentParser(argparse.ArgumentParser):
    """argparse with the scripts' conventions: the docstring is the help's description, every flag's default is
    shown (unless its help already says it), and a bad flag is one line `error: ...` with exit code 2, as every
    other input error (argparse's usage lines would bury it)."""

    def __init__(self, doc):  # no abbreviations: `--max_step 5` is refused, not silently taken for --max_steps
        super().__init__(description=doc, formatter_class=_HelpFormatter, allow_abbrev=False)

    def error(self, message):
        _say_error(f"{message} (see --help)")
        self.exit(2)


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    def _get_help_string(self, action):
        text = action.help or ""
        if ("default" in text or action.default is None or action.default is False or action.default == argparse.SUPPRESS
                or not action.option_strings):
            return text
        return text + " (default: %(default)s)"


def _number(kind, ok, what, finite=True):
    """An argparse type: a (finite) `kind` number for which ok(value) holds, or argparse's error naming the flag."""
    def parse(text):
        value = kind(text)  # a ValueError becomes argparse's "invalid int value"
        if not ok(value) or (finite and not math.isfinite(value)):
            raise argparse.ArgumentTypeError(f"{text} is not {what}")
        return value
    parse.__name__ = kind.__name__
    return parse


POSITIVE_INT = _number(int, lambda v: v > 0, "a positive integer")
COUNT = _number(int, lambda v: v >= 0, "0 or a positive integer")
POSITIVE = _number(float, lambda v: v > 0, "positive")
BASE_LR = _number(float, lambda v: v > 0, "positive", finite=False)  # inf: caught by the non-finite checks (FAULTS.md)
NON_NEGATIVE = _number(float, lambda v: v >= 0, "0 or more")
MOMENTUM = _number(float, lambda v: 0 <= v < 1, "in [0, 1)")  # EMA momenta
OPEN_FRACTION = _number(float, lambda v: 0 < v < 1, "in (0, 1)")  # the mask ratio
AREA = _number(float, lambda v: 0 < v <= 1, "in (0, 1]")  # the smallest crop area


def add_common_args(p, epochs, batch_size, blr, warmup_frac, out_dir, epochs_help="passes over the training set",
                    dataset="synthetic", batch_note="", warmup_source="the paper"):
    """The flags every stage spells the same way; each script passes its own defaults (stages 2-3: dataset=None,
    the input checkpoint's; see data.input_data) and where its batch and warm-up come from (batch_note, warmup_source)."""
    g = p.add_argument_group("data and model")
    g.add_argument("--dataset", default=dataset, help="cifar10 | cifar100 | fashion_mnist | imagefolder | synthetic (generated tiled shapes, no download)"
                   + (" (default: the one the --init_from checkpoint was trained on)" if dataset is None else ""))
    g.add_argument("--data_path", default=None, help="dataset root (torchvision root, or a folder with train/ and val/ for imagefolder)"
                   + ("; default: the checkpoint's, when --dataset is its dataset too" if dataset is None else ""))
    g.add_argument("--img_size", type=POSITIVE_INT, default=None, help="input side in pixels (default: 32 for CIFAR/synthetic, 28 for Fashion-MNIST; an image folder keeps images of at most 64 px, else 224)")
    g.add_argument("--data_on_gpu", type=int, default=None, choices=[0, 1], help="hold the uint8 dataset on the training device and augment there in batches; image folders only, the other datasets always are (default: on for small folders)")
    g.add_argument("--num_workers", type=COUNT, default=8, help="DataLoader workers per process (file-backed datasets only)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=POSITIVE_INT, default=epochs, help=epochs_help)
    g.add_argument("--batch_size", type=POSITIVE_INT, default=batch_size, help="GLOBAL batch in images, split over all processes" + batch_note)
    g.add_argument("--blr", type=BASE_LR, default=blr, help="base learning rate: lr = blr * views_per_step / 256")
    g.add_argument("--warmup_epochs", type=NON_NEGATIVE, default=None, help=f"linear warm-up before the cosine decay (default: {warmup_frac * 100:.0f}%% of --epochs, as {warmup_source})")
    p.set_defaults(warmup_frac=warmup_frac)
    g.add_argument("--max_steps", type=POSITIVE_INT, default=None, help="stop after this many steps (smoke runs); the schedule still spans --epochs")
    g = p.add_argument_group("run")
    g.add_argument("--out_dir", default=out_dir, help="run folder: ckpt.pt, log.jsonl, pictures")
    g.add_argument("--resume", action="store_true", help="continue from OUT_DIR/ckpt.pt (fails if there is none)")
    g.add_argument("--compile", type=int, default=None, choices=[0, 1], help="torch.compile the model (default: on for CUDA)")
    g.add_argument("--precision", default=None, choices=["bf16", "fp32"], help="autocast dtype (default: bf16 on CUDA, fp32 on CPU)")
    g.add_argument("--seed", type=int, default=0, help="seed; every random draw is a function of (seed, rank, step), a file-backed "
                   "image's crops of (seed, epoch, image). "
                   "With --dataset synthetic it also picks the generated images: keep it across the stages")
    g.add_argument("--log_every", type=POSITIVE_INT, default=20, help="steps between progress lines")
    g.add_argument("--save_every", type=POSITIVE_INT, default=None, help="steps between checkpoints (default: once per epoch)")
    g.add_argument("--eval_every", type=COUNT, default=0, help="epochs between k-NN checks on the val split, logged to log.jsonl (0: none; evaluate.py does the full evaluation)")
    g.add_argument("--device", default=None, help="cuda | cpu (default: cuda when available)")
    return p


# ---------------------------------------------------------------- checks of the flags, before anything starts
def check_out_dir(out_dir):
    """An --out_dir that can be made (or is there), checked before any work, without making it yet: a path under a
    file, or in a folder this user cannot write to, would otherwise fail only when the first file is written."""
    if not str(out_dir):
        raise UserError("--out_dir is empty")
    path = os.path.join(os.getcwd(), out_dir)  # not abspath: "file/../run" must fail here as it will in makedirs
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"--out_dir {out_dir} is a file, not a folder")
    parent = path
    while not os.path.exists(parent):  # the nearest part of the path that exists: the folder it will be made in
        if os.path.islink(parent):
            raise UserError(f"--out_dir {out_dir} cannot be made: {parent} is a broken link")
        parent = os.path.dirname(parent)  # of "a/f/..", "a/f": makedirs needs it to be a folder first
    if not os.path.isdir(parent):
        raise UserError(f"--out_dir {out_dir} cannot be made: {parent} is a file")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"--out_dir {out_dir}: no permission to write in {parent}")


def checkpoint_path(args):
    """OUT_DIR/ckpt.pt, where every stage saves and --resume continues from (so it must exist then)."""
    check_out_dir(args.out_dir)
    path = os.path.join(args.out_dir, "ckpt.pt")
    if args.resume and not os.path.isfile(path):
        raise UserError(f"--resume but there is no checkpoint at {path}")
    return path


def check_batch(batch_size, n_train):
    """The loaders drop the last partial batch: a global batch larger than the data would train for no step."""
    if n_train < batch_size:
        raise UserError(f"--batch_size {batch_size} is larger than the training set ({n_train} images)")


def check_per_rank(n, what, world):
    """Feature extraction deals a split out to the ranks; one without images would leave the others waiting."""
    if n < world:
        raise UserError(f"{what} has {n} images, fewer than the {world} processes")


def check_queue(args, n_train):
    """Resolve --queue_size and refuse settings that the FIFO cannot honour."""
    if args.queue_size is None:
        args.queue_size = max(args.batch_size, min(65536, n_train) // args.batch_size * args.batch_size)
    if args.queue_size % args.batch_size:
        raise UserError(f"--queue_size {args.queue_size} is not a multiple of the global batch {args.batch_size}")
    if getattr(args, "topk", 1) > args.queue_size:
        raise UserError(f"--topk {args.topk} is larger than the queue ({args.queue_size})")


def check_compile_mode(args):
    """Stages 2-3: CUDA graphs only in one process: the cross-rank gathers inside the one graph are untested."""
    if args.compile_mode != "default" and int(os.environ.get("WORLD_SIZE", 1)) > 1:
        raise UserError("--compile_mode reduce-overhead is for one process: the cross-rank gather inside the "
                        "graph is untested")


# ---------------------------------------------------------------- process setup
@dataclass
class Proc:
    rank: int
    world: int
    device: torch.device
    dtype: torch.dtype  # autocast dtype; float32 means no autocast

    @property
    def main(self):
        return self.rank == 0

    def autocast(self):
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def print(self, *a, **k):
        if self.main:
            print(*a, **k, flush=True)


def setup(args):
    """Single process, or one process per GPU/CPU slot under torchrun (NCCL on GPU, gloo on CPU)."""
    dev = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if dev != "cpu" and not (dev == "cuda" or (dev.startswith("cuda:") and dev[5:].isdigit())):
        raise UserError(f"--device {dev}: use cuda, cuda:N or cpu")
    if dev.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda but no GPU is visible")
    if dev.startswith("cuda:") and int(dev[5:]) >= torch.cuda.device_count():
        raise UserError(f"--device {dev}: only {torch.cuda.device_count()} GPU(s) visible (cuda:0 ...)")
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if args.batch_size % world:
        raise UserError(f"--batch_size {args.batch_size} is not divisible by the {world} processes")
    if world > 1:
        local = int(os.environ.get("LOCAL_RANK", 0))
        if dev.startswith("cuda"):
            torch.cuda.set_device(local)
            dev = f"cuda:{local}"
        dist.init_process_group("nccl" if dev.startswith("cuda") else "gloo")
    elif dev.startswith("cuda:"):  # the current device too: memory stats, CUDA graphs and events follow it, not the tensors
        torch.cuda.set_device(int(dev[5:]))
    device = torch.device(dev)
    args.device = str(device)  # resolved, for the config line and the checkpoint's arguments
    if getattr(args, "warmup_epochs", 0) is None:
        args.warmup_epochs = args.warmup_frac * args.epochs
    precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    args.precision = precision
    if args.compile is None:
        args.compile = int(device.type == "cuda")
    torch.manual_seed(args.seed)  # model init: identical on every rank (DDP also broadcasts it)
    # No TF32 (GPU matmuls and convolutions with ~10 mantissa bits): bf16 autocast is the fast path, and the fp32
    # left under it is fp32 on purpose (the queue lookup's and the loss's similarities, the metrics: TF32 would round
    # their cosines at ~1e-3 and flip near-ties in the top-k); --precision fp32 is for exact numbers. (CPU: no effect.)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    return Proc(rank, world, device, torch.bfloat16 if precision == "bf16" else torch.float32)


def compile_nnclr(model, mode="default"):
    """torch.compile a stages-2/3 model (model.MAECT); returns what to call for the forward. The default modes
    compile the encoder and the head and leave the lookup and the loss eager; reduce-overhead (CUDA graphs) compiles
    the whole forward as one graph: the frozen lower half runs without gradient, and as a graph of its own its
    output would count as finished, free to be overwritten, before the upper half reads it."""
    if mode == "reduce-overhead":
        return torch.compile(model, mode=mode)
    model.encoder.compile(mode=mode)
    model.head.compile(mode=mode)
    return model


def ddp(model, proc):
    """Wrap in DistributedDataParallel when there are several processes. Buffers are not synced at each forward
    (DDP broadcasts them once, from rank 0, when it wraps the model): the queue and the BN statistics stay identical
    on every rank by construction (the same seed builds the model everywhere, every rank enqueues the same gathered
    batch, and the BN statistics cover the global batch)."""
    if proc.world == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP
    import inspect
    sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(DDP).parameters
            else {"broadcast_buffers": False})  # the flag was renamed in torch 2.12+
    return DDP(model, device_ids=[proc.device.index] if proc.device.type == "cuda" else None, **sync)


def seed_step(seed, rank, step):
    """Reseed every generator from (seed, rank, step) before each step: masking noise, crops and top-k draws
    differ per rank and per step, and a resumed run replays exactly what an uninterrupted one would.

    One 32-bit number (the CPU generator keeps only the low 32 bits of a seed) with ranks 2^22 steps apart: within a
    run, no two (rank, step) pairs draw alike for up to 1024 ranks and 4,194,304 steps.
    """
    torch.manual_seed((seed * 1_000_003 + rank * 2**22 + step) % 2**32)


# ---------------------------------------------------------------- cross-rank gathers
class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums the incoming gradients over ranks and returns this rank's slice, so
    a loss computed against the gathered tensor trains every rank's inputs (SimCLR/MoCo v3 style)."""

    @staticmethod
    def forward(ctx, x):
        out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(out, x.contiguous())
        return torch.cat(out)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad)
        n = grad.shape[0] // dist.get_world_size()
        return grad[dist.get_rank() * n:(dist.get_rank() + 1) * n]


def gather(x, grad=False):
    """Concatenate x (n, ...) from all ranks in rank order; identity in a single process."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    if grad:
        return _GatherWithGrad.apply(x)
    out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out)


# ---------------------------------------------------------------- schedules and optimiser
def lr_at(step, total, warmup, peak):
    """Linear warm-up to `peak` over `warmup` steps, then half-cosine to 0 at `total` (a pure function of the
    step, so resuming needs no scheduler state)."""
    if step < warmup:
        return peak * step / warmup
    t = (step - warmup) / max(1, total - warmup)
    return peak * 0.5 * (1.0 + math.cos(math.pi * min(t, 1.0)))


def set_lr(opt, lr):
    for g in opt.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)


def decay_groups(named_params, weight_decay, lr_scale=1.0):
    """Two param groups: weight decay on matrices only; biases, norms and tokens (1-D, or named *_token) none
    (MAE's recipe)."""
    decay, no_decay = [], []
    for n, p in named_params:
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or n.endswith("_token") else decay).append(p)
    return [g for g in (dict(params=decay, weight_decay=weight_decay, lr_scale=lr_scale),
                        dict(params=no_decay, weight_decay=0.0, lr_scale=lr_scale)) if g["params"]]


BETAS = (0.9, 0.95)  # AdamW's in every stage: the MAE authors' (stage 1), the MAE-CT authors' (all stage-2/3 configs)


def adamw(groups, betas, device):
    """AdamW; fused on CUDA (one kernel for all parameters)."""
    return torch.optim.AdamW(groups, lr=0.0, betas=betas, fused=device.type == "cuda")


def load_optimizer(opt, state):
    """Resume AdamW's moments and step counts but keep this run's settings of each group (lr scale, weight decay):
    torch's load_state_dict would restore the saved ones, so a --layer_decay, --head_blr or --weight_decay changed
    at --resume would be silently ignored, while --blr and --epochs (the lr is set every step) would not."""
    settings = [{k: g[k] for k in ("lr_scale", "weight_decay") if k in g} for g in opt.param_groups]
    opt.load_state_dict(state)
    for g, kept in zip(opt.param_groups, settings):
        g.update(kept)


@torch.no_grad()
def ema_update(target, online, momentum):
    """target = m * target + (1 - m) * online, over parameters (one fused op for all of them). Buffers are left
    alone: a target BatchNorm keeps its own running statistics (the authors copy the online ones; no effect on
    training, where BN uses batch statistics, nor on evaluation, which never uses the target)."""
    torch._foreach_lerp_(list(target.parameters()), list(online.parameters()), 1.0 - momentum)


# ---------------------------------------------------------------- checkpoints
_writer = {"thread": None, "error": None}  # the checkpoint being written in the background, if any


def save_checkpoint(path, background=False, **payload):
    """Plain tensors and primitives only (loads with weights_only=True); written to a temp file and renamed
    so that a kill never leaves a half-written checkpoint, and the previous one survives until the rename.
    Non-finite weights are refused: a finite loss does not prove the update after it was finite (an inf
    learning rate, say), and a NaN model must never replace the last good checkpoint.
    background=True (the training loops in one process): the tensors are copied to the CPU here and a thread
    writes the file, so training does not wait for the disk (on a GPU, a save per epoch cost ~0.2 s, a tenth of
    a small epoch); the next save, load_checkpoint and finish_saves wait for it. Under DDP the loops save in the
    foreground, so that the barrier after a save means the file is on disk for every rank."""
    floats = [v for v in payload.get("model", {}).values() if torch.is_tensor(v) and v.is_floating_point()]
    if floats and not bool(torch.stack([torch.isfinite(v).all() for v in floats]).all()):  # one host sync
        bad = [k for k, v in payload["model"].items() if torch.is_tensor(v) and v.is_floating_point()
               and not bool(torch.isfinite(v).all())]
        raise UserError(f"non-finite weights at step {payload.get('step')} ({bad[0]}{' ...' if len(bad) > 1 else ''}): "
                        f"not saved; the last good checkpoint is {path} (lower --blr or check the data)")
    payload.setdefault("torchrun_id", os.environ.get("TORCHELASTIC_RUN_ID"))  # which job wrote it: want_resume
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    finish_saves()
    if not background:
        return _write(path, payload)
    snapshot = _to_cpu(payload)  # a copy, also of CPU tensors: training changes them in place meanwhile
    _writer["thread"] = threading.Thread(target=_write, args=(path, snapshot, True), daemon=False)
    _writer["thread"].start()


def save_on_main(proc, path, **payload):
    """The training loops' save: rank 0 writes the checkpoint (in the background in one process), and under DDP
    every rank waits at a barrier until it is on disk, so that a restarted job finds it whichever rank failed."""
    if proc.main:
        save_checkpoint(path, background=proc.world == 1, **payload)
    if proc.world > 1:
        dist.barrier()


def _to_cpu(x):
    if torch.is_tensor(x):
        return x.detach().to("cpu", copy=True)
    if isinstance(x, dict):  # a state dict keeps its type and version metadata
        out = type(x)((k, _to_cpu(v)) for k, v in x.items())
        if hasattr(x, "_metadata"):
            out._metadata = x._metadata
        return out
    if isinstance(x, (list, tuple)):
        return type(x)(_to_cpu(v) for v in x)
    return x


def _write(path, payload, in_thread=False):
    tmp = f"{path}.tmp"
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    except BaseException as e:
        disk = isinstance(e, (OSError, RuntimeError))  # torch.save reports a full disk as a RuntimeError
        if in_thread:  # reported by the next finish_saves
            _writer["error"] = f"cannot write checkpoint {path}: {e if disk else f'{type(e).__name__}: {e}'}"
        elif disk:
            raise UserError(f"cannot write checkpoint {path}: {e}")
        else:
            raise


def finish_saves():
    """Wait for a background checkpoint write; a failed one (disk full, say) stops the run here."""
    if _writer["thread"] is not None:
        _writer["thread"].join()
        _writer["thread"] = None
    if _writer["error"]:
        msg, _writer["error"] = _writer["error"], None
        raise UserError(msg)


def want_resume(args, ckpt_path):
    """Resume from ckpt_path with --resume, or by itself when torchrun restarted this job after a crash
    (--max_restarts; torchrun sets TORCHELASTIC_RESTART_COUNT > 0 in the restarted workers) and the failed
    attempt got as far as a checkpoint. Otherwise start fresh. "This job's checkpoint": save_checkpoint records
    torchrun's run id (TORCHELASTIC_RUN_ID), so that an older run's checkpoint left in the folder is not continued
    when the first attempt crashed before its first save. The id is unique with `torchrun --standalone`, and with a
    unique --rdzv_id on several nodes; otherwise it is "none" for every job (also a plain single-node torchrun on
    older torch releases), and any checkpoint in the folder is taken as this job's."""
    restarted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0)) > 0
    if args.resume or not restarted or not os.path.isfile(ckpt_path):
        return bool(args.resume)
    run_id = os.environ.get("TORCHELASTIC_RUN_ID", "none")
    if run_id == "none":  # shared by every job: this job's checkpoint cannot be told from an older run's
        return True
    try:  # mmap: reads the small key, not the weights
        saved = torch.load(ckpt_path, map_location="cpu", weights_only=True, mmap=True).get("torchrun_id")
    except Exception:
        return False  # unreadable: not a checkpoint this job wrote (those are renamed into place whole)
    return saved == run_id


# What a resumed run may change: where and how it runs (and how often it logs and saves), and the optimiser's and
# EMAs' settings (load_optimizer keeps this run's; to go on lower after a divergence, say); not what the step count
# means or what is trained on.
RESUME_MAY_CHANGE = {"out_dir", "resume", "max_steps", "log_every", "save_every", "eval_every", "pictures", "device",
                     "num_workers", "data_on_gpu", "data_path", "init_from", "compile", "compile_mode", "precision",
                     "blr", "head_blr", "weight_decay", "head_weight_decay", "layer_decay", "target_ema", "encoder_ema"}


def check_resume_args(args, ckpt, path):
    """A resumed run continues the saved one's schedule step by step, so the flags that set what it trains (batch,
    epochs, warm-up, seed, model, data, ...) must be as they were: another --batch_size or --epochs would silently
    reinterpret the step count."""
    saved, now = ckpt.get("args", {}), args_dict(args)
    changed = sorted(k for k in saved.keys() & now.keys() if k not in RESUME_MAY_CHANGE and saved[k] != now[k])
    show = lambda v: f"{v:.6g}" if isinstance(v, float) else v
    if changed:
        raise UserError(f"{path} was trained with " + ", ".join(f"--{k} {show(saved[k])} (now {show(now[k])})"
                                                                 for k in changed[:4])
                        + ": resume with its settings, or start a new run in another --out_dir")


STAGES = {"mae": "a stage-1 MAE checkpoint (pretrain_mae.py)", "official": "official MAE or MAE-CT weights",
          "head": "a stage-2 checkpoint (init_head.py)", "ct": "a stage-3 MAE-CT checkpoint (contrastive_tune.py)"}


def load_checkpoint(path, stages=None):
    """Load a checkpoint safely (weights_only=True: no pickled code runs) and check its stage. Weights from
    elsewhere are returned as {"model": state_dict, "stage": "official"}: an official MAE `.pth` (that layout
    already; the official training checkpoints, checkpoint-799.pth, also pickle their argparse.Namespace, a plain
    attribute holder that is let through), the MAE-CT authors' released encoders and a bare state dict
    (`weights_file`)."""
    finish_saves()
    if not path or not os.path.isfile(path):
        raise UserError(f"checkpoint not found: {path}")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, not a checkpoint, or a pickle that wants to run code
        text = re.sub(r"\x1b\[[0-9;]*m", "", str(e))
        unsafe = re.search(r"Unsupported global: GLOBAL (\S+)", text)
        if unsafe:
            raise UserError(f"cannot read checkpoint {path}: it pickles {unsafe.group(1)}, which a safe load refuses "
                            f"(unsafe pickle); if you trust the file, save its weights alone and pass that file: "
                            f"python -c \"import torch; c = torch.load('{path}', weights_only=False); "
                            f"torch.save({{'model': c['model'] if 'model' in c else c['state_dict']}}, 'weights.pth')\"")
        first = next((line.strip() for line in text.splitlines() if line.strip()), "")
        raise UserError(f"cannot read checkpoint {path} (corrupt, not a checkpoint, or unsafe pickle): "
                        f"{type(e).__name__} {first[:200]}".rstrip())
    ckpt = weights_file(ckpt)
    if not isinstance(ckpt, dict) or "model" not in ckpt or not isinstance(ckpt["model"], dict):
        raise UserError(f"{path} is not a checkpoint of this project, nor ViT weights in a layout we know ({{'model': "
                        f"state dict}} as facebookresearch/mae, {{'state_dict': ...}} as ml-jku/MAE-CT, or a bare "
                        f"state dict)")
    ckpt.setdefault("stage", "official")
    if stages and ckpt["stage"] not in stages:
        hint = " (run init_head.py on it first)" if stages == ["head"] and ckpt["stage"] in ("mae", "official") else ""
        raise UserError(f"{path} holds {STAGES.get(ckpt['stage'], repr(ckpt['stage']))}; this stage needs "
                        + " or ".join(STAGES[s] for s in stages) + hint)
    return ckpt


def weights_file(ckpt):
    """The other layouts of ViT encoder weights, as {"model": state_dict} (anything else is returned as it is):
    - the MAE-CT authors' released encoders (ml-jku/MAE-CT, `maect_base16.th`, `mae_reimpl_base16.th`, ...):
      {"state_dict": encoder weights, "ctor_kwargs": their model config}, whose `attention_heads` is kept as
      "num_heads" (the one setting the weights cannot tell); their pos_embed has no CLS row (model.py pads it);
    - a bare state dict (`torch.save(vit.state_dict())`, as timm's): tensors only, with a CLS token."""
    if not isinstance(ckpt, dict) or "model" in ckpt:
        return ckpt
    if isinstance(ckpt.get("state_dict"), dict):
        out = {"model": ckpt["state_dict"]}
        heads = (ckpt.get("ctor_kwargs") or {}).get("attention_heads")
        if isinstance(heads, int) and not isinstance(heads, bool):
            out["num_heads"] = heads
        return out
    if "cls_token" in ckpt and all(torch.is_tensor(v) for v in ckpt.values()):
        return {"model": ckpt}
    return ckpt


def load_strict(module, sd, what):
    """load_state_dict(strict) that names exactly which keys are missing, unexpected or of the wrong shape."""
    own = module.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shapes = [f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}" for k in own if k in sd and sd[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        parts = [f"missing {missing[:5]}" if missing else "", f"unexpected {unexpected[:5]}" if unexpected else "",
                 f"wrong shape {shapes[:3]}" if shapes else ""]
        raise UserError(f"{what} does not match the model: " + "; ".join(p for p in parts if p))
    module.load_state_dict(sd)


def add_num_heads_arg(group):
    """--num_heads, for the scripts that read official MAE / timm files (stage 2, evaluate.py)."""
    group.add_argument("--num_heads", type=POSITIVE_INT, default=None,
                       help="attention heads of an official/timm file, which does not record them (default: the preset's "
                            "for its width and depth, as the official MAE models have: B 12, L and H 16); our "
                            "checkpoints and the MAE-CT authors' files carry their own")


def encoder_from_checkpoint(ckpt, what, num_heads=None):
    """(model config, encoder state dict) from a checkpoint of any stage or an official MAE file. The head count
    is the one thing the weights cannot tell (the qkv shapes are the same for any): ours record it, and so do the
    MAE-CT authors' files ("num_heads", from `weights_file`); for an official or timm file it is the preset's of
    that width and depth unless `num_heads` (--num_heads) says otherwise."""
    from model import encoder_state_dict, infer_encoder_config
    sd = encoder_state_dict(ckpt["model"])
    if "config" in ckpt:
        cfg = ckpt["config"]
        if num_heads is not None and num_heads != cfg["num_heads"]:
            raise UserError(f"--num_heads {num_heads}, but {what} was trained with {cfg['num_heads']} heads "
                            "(the flag is for official/timm files, which do not record it)")
        return cfg, sd
    try:
        cfg = infer_encoder_config(sd)
    except (KeyError, ValueError, IndexError) as e:
        raise UserError(f"{what}: cannot tell the model size from its weights ({e})")
    recorded = ckpt.get("num_heads")
    if recorded is not None and num_heads is not None and num_heads != recorded:
        raise UserError(f"--num_heads {num_heads}, but {what} records {recorded} attention heads")
    num_heads = num_heads if num_heads is not None else recorded
    if num_heads is not None:
        if cfg["embed_dim"] % num_heads:
            raise UserError(f"--num_heads {num_heads} does not divide the width {cfg['embed_dim']} of {what}")
        cfg = dict(cfg, num_heads=num_heads)
    return cfg, sd


def args_dict(args):
    """The arguments as a plain dict of primitives for the checkpoint (never a pickled Namespace)."""
    return {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool, type(None)))}


# ---------------------------------------------------------------- logging
def nn_accuracy(nn_idx, labels, train_labels):
    """Fraction of looked-up neighbours (their dataset indices, as the NNCLR forwards return them; -1 = empty slot,
    never right) whose image has the query's label: a diagnostic for the log, never used for training."""
    return ((nn_idx >= 0) & (train_labels[nn_idx.clamp(min=0)] == labels)).float().mean()


class Logger:
    """One progress line every `every` steps (step/total, loss, lr, img/s, ETA, GPU memory) on rank 0, and one JSON
    line per log/eval in OUT_DIR/log.jsonl. Call `step()` each step; values are only `.item()`-ed at log time.
    img/s counts training images (images_per_step: the global batch), whatever the views each gets, so that
    dataset size / img/s is an epoch's time in every stage."""

    def __init__(self, proc, out_dir, total_steps, start_step, images_per_step, every, last_step=None):
        self.proc, self.total, self.every, self.ips = proc, total_steps, every, images_per_step
        self.last = last_step or total_steps  # a --max_steps run logs its final step too
        self.path = os.path.join(out_dir, "log.jsonl")
        self.t0, self.s0, self.first = time.time(), start_step, True
        if proc.main and os.path.exists(self.path):
            self.keep_until(start_step)

    def keep_until(self, step):
        """A fresh run (step 0) starts a new log; a resumed one keeps the lines up to its checkpoint's step, so
        what was logged between that checkpoint and a kill (and a line cut short by it) is not there twice."""
        kept = []
        with open(self.path) as f:
            for line in f:
                try:
                    if json.loads(line)["step"] <= step:
                        kept.append(line if line.endswith("\n") else line + "\n")
                except (ValueError, KeyError, TypeError):
                    pass  # a line cut short by the kill
        with open(self.path + ".tmp", "w") as f:
            f.writelines(kept)
        os.replace(self.path + ".tmp", self.path)

    def due(self, step):
        return step % self.every == 0 or step == self.last

    def __call__(self, step, **scalars):
        """Log after finishing `step` (1-based count of steps done) if it is due."""
        if not self.due(step):
            return
        vals = {k: (v.item() if torch.is_tensor(v) else v) for k, v in scalars.items()}
        if self.proc.device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.time() - self.t0
        rate = (step - self.s0) * self.ips / max(dt, 1e-9)
        eta = (self.last - step) * self.ips / max(rate, 1e-9)
        mem = torch.cuda.max_memory_allocated() / 2**30 if self.proc.device.type == "cuda" else 0.0  # peak
        body = " ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in vals.items())
        shown = f" | mem {mem:.1f} GiB" if self.proc.device.type == "cuda" else ""
        of = f"{self.last} (--max_steps; schedule {self.total})" if self.last < self.total else f"{self.total}"
        first = " (startup and compilation included)" if self.first else ""
        self.proc.print(f"step {step}/{of} {body} | {rate:,.0f} img/s{first} | ETA {eta / 60:.1f} min{shown}")
        self.write(dict(step=step, **vals, img_per_s=round(rate, 1), mem_gib=round(mem, 2)))
        self.t0, self.s0, self.first = time.time(), step, False

    def event(self, step, **vals):
        """An evaluation result: one line on stdout and one JSON line, whenever it happens. The next progress line
        counts from here, so its img/s and ETA leave the evaluation's time out."""
        self.proc.print(f"eval at step {step}: " + " ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in vals.items()))
        self.write(dict(step=step, **vals))
        self.t0, self.s0 = time.time(), step

    def write(self, record):
        if self.proc.main:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


def check_finite(loss, step, ckpt_path):
    """Stop on a non-finite loss. Called at log and checkpoint time only (a check per step would cost a host
    sync per step); the check before every save means a NaN model never overwrites the last good checkpoint."""
    bad = (~torch.isfinite(loss)).float()
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(bad)  # every rank stops together, even if only one saw the NaN
    if bad.item():
        finish_saves()  # a checkpoint still being written is the last good one
        last = f"the last good checkpoint is {ckpt_path}" if os.path.isfile(ckpt_path) else "no checkpoint was saved"
        raise UserError(f"non-finite loss at step {step}: stopping; {last} (lower --blr or check the data)")


def print_config(proc, args, **extra):
    proc.print("config: " + json.dumps({**args_dict(args), **extra}, default=str))
