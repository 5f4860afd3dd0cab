"""Stage 2: train an NNCLR head on the frozen MAE encoder (MAE-CT, Sec. 3).

Contrastive tuning needs a head that already structures the embedding well; a random head would first pull the
encoder towards its own noise. So: encoder frozen (eval mode, no gradient), head trained with NNCLR where the
positive of each view is the exact nearest neighbour (top-1) of the other view in a queue of past embeddings.
For MAE-CT_aug the authors train this head on the BYOL colour views (--views aug); stage 3 then keeps them.

    # CPU smoke run on generated shapes, from a stage-1 checkpoint
    python init_head.py --init_from runs/mae_smoke/ckpt.pt --dataset synthetic --epochs 3 --out_dir runs/head_smoke --device cpu
    # CIFAR-10 on one GPU
    python init_head.py --init_from runs/mae_c10/ckpt.pt --dataset cifar10 --data_path data/ --out_dir runs/head_c10
    # ImageNet from the official MAE ViT-B/16 weights, 8 GPUs (paper: 20 epochs, batch 1024, queue 65536)
    torchrun --standalone --nproc_per_node=8 init_head.py --init_from mae_pretrain_vit_base.pth --dataset imagefolder \\
        --data_path /data/imagenet --img_size 224 --batch_size 1024 --out_dir runs/head_in1k

The NN accuracy in the log (how often the looked-up neighbour has the query's label; monitoring only, labels are
never used for training) should rise during the run. It also says whether stage 3 can help: the looked-up neighbour
becomes stage 3's positive, so the method needs it to share the object often. Measured (RESULTS.md): about 0.7 for
ViT-T on Fashion-MNIST (one H200, 20 epochs in ~60 s), where MAE-CT clearly beats its MAE; 0.4-0.5 for ViT-nano on
Fashion-MNIST on CPU, where it gains a little; on the CIFAR-10 5k subset 0.19 (chance 0.10), where it does not.
Writes OUT_DIR/ckpt.pt (stage "head") and log.jsonl.
"""
import os

import common
import data
import evaluate
from model import MAECT


def parse_args(argv=None):
    p = common.ArgumentParser(__doc__)
    common.add_common_args(p, epochs=20, batch_size=1024, blr=1e-4, warmup_frac=0.2, out_dir="runs/head", dataset=None,
                           batch_note="; the paper: 1024, for ViT-H 512 (and 30 epochs for H/16)")
    add_head_args(p)
    return p.parse_args(argv)


def add_head_args(p, stage3=False):
    """NNCLR flags, shared with contrastive_tune.py. In stage 3 (stage3=True) the head's shape, its pooling and the
    queue length default to the stage-2 checkpoint's, and the temperature to the paper's for the model size and the
    variant (the head's views)."""
    g = p.add_argument_group("NNCLR")
    g.add_argument("--init_from", required=True, help="checkpoint of the previous stage, an official MAE .pth, or the MAE-CT "
                   "authors' MAE (mae_reimpl_base16.th, README)")
    if not stage3:
        common.add_num_heads_arg(g)
    inherit = " (default: the stage-2 head's)" if stage3 else ""
    g.add_argument("--pooling", default=None, choices=["mean", "cls"], help="encoder feature: mean of patch tokens or CLS"
                   + (inherit or " (default: the paper's choice for the model size)"))
    g.add_argument("--queue_size", type=common.POSITIVE_INT, default=None, help="queue length; a multiple of the global batch"
                   + (inherit or " (default: min(65536, train size) rounded down to one)"))
    g.add_argument("--temperature", type=common.POSITIVE, default=None if stage3 else 0.15, help="softmax temperature of the NNCLR loss "
                   + ("(default: the paper's for the model size and variant, 0.15 B and smaller, 0.2 L, 0.3 H; "
                      "MAE-CT_aug 0.15, 0.35 H)" if stage3 else "(paper: 0.15)"))
    for flag, default, text in [("--proj_hidden", 2048, "projector hidden width"),
                                ("--proj_dim", 256, "embedding width (projector output, queue entries)"),
                                ("--pred_hidden", 4096, "predictor hidden width")]:
        g.add_argument(flag, type=common.POSITIVE_INT, default=None if stage3 else default, help=text + inherit)
    g.add_argument("--head_weight_decay", type=common.NON_NEGATIVE, default=1e-5, help="AdamW weight decay of the head")
    g.add_argument("--views", default=None if stage3 else "minimal", choices=["minimal", "aug"],
                   help="minimal = crop + flip (MAE-CT); aug = the BYOL colour pipeline too (MAE-CT_aug, whose head the "
                        "authors also train on it)" + (" (default: the stage-2 head's; it also picks the defaults of "
                                                       "--topk, --head_blr, --epochs, --temperature)" if stage3
                                                       else "; stage 3 keeps this checkpoint's"))
    g.add_argument("--crop_min", type=common.AREA, default=0.08, help="smallest crop area of the views, as a fraction of the image (RandomResizedCrop scale (crop_min, 1); paper: 0.08)")
    if stage3:
        measured = ("1.51x the images/s of ViT-T on 28 px in this script (BENCHMARKS.md), whose step is bound by the "
                    "host; reproduce.sh's ViT-T recipes use it on one GPU. The top-k draws come from another random "
                    "stream than in the default mode, so resume a run in the mode it started in")
    else:
        measured = ("not yet measured on a GPU for this stage (stage 3 gained 1.51x, BENCHMARKS.md), so no recipe "
                    "uses it here. The lookup is exact (top-1): both modes train alike")
    g.add_argument("--compile_mode", default="default", choices=["default", "reduce-overhead"],
                   help="default: the encoder and the head are compiled, the lookup and the loss run eagerly. "
                        "reduce-overhead: the whole forward (encoder, head, lookup, loss) compiled as one graph and "
                        "replayed as CUDA graphs; with --compile 1 (the default on CUDA), one process only; " + measured)
    return p


def main():
    args = parse_args()
    common.check_compile_mode(args)
    ckpt_path = common.checkpoint_path(args)
    prev = common.load_checkpoint(args.init_from, stages=["mae", "official"])
    cfg, enc_sd = common.encoder_from_checkpoint(prev, args.init_from, args.num_heads)
    data.input_data(args, prev.get("args", {}), cfg, args.init_from)  # --dataset: the MAE's unless given
    args.pooling = args.pooling or cfg["pooling"]

    # ---- process ----
    proc = common.setup(args)
    local_batch = args.batch_size // proc.world

    # ---- data: two views per image, crop + flip (MAE-CT) or with colour too (MAE-CT_aug) ----
    train = data.load_split(args.dataset, args.data_path, "train", args.img_size, args.data_on_gpu, args.seed)
    common.check_batch(args.batch_size, len(train))
    common.check_queue(args, len(train))
    loader = data.ViewLoader(train, local_batch, args.views, 2, args.img_size, proc.device, proc.rank, proc.world,
                             args.seed, num_workers=args.num_workers, crop_scale=(args.crop_min, 1.0))
    train_labels = train.labels.to(proc.device)
    val = data.load_split(args.dataset, args.data_path, "val", args.img_size, args.data_on_gpu, args.seed) if args.eval_every else None
    if val is not None:
        common.check_per_rank(len(val), "val", proc.world)  # --eval_every's k-NN deals it out to the ranks
    steps_per_epoch = len(loader)
    total_steps = args.epochs * steps_per_epoch
    warmup_steps = int(args.warmup_epochs * steps_per_epoch)

    # ---- model: frozen encoder from stage 1, fresh head (PyTorch's default init, as the authors' head) ----
    model = MAECT(cfg, args.queue_size, args.pooling, args.proj_hidden, args.proj_dim, args.pred_hidden)
    common.load_strict(model.encoder, enc_sd, args.init_from)
    model.encoder.freeze(cfg["depth"])  # every block and the final norm: no gradient at all
    model.to(proc.device)

    # ---- optimiser: lr = blr * views per step / 256 ----
    lr = args.blr * args.batch_size * 2 / 256
    groups = common.decay_groups(model.head.named_parameters(), args.head_weight_decay)
    opt = common.adamw(groups, common.BETAS, proc.device)
    step = 0
    if common.want_resume(args, ckpt_path):  # --resume, or a restart by torchrun --max_restarts
        ckpt = common.load_checkpoint(ckpt_path, stages=["head"])
        common.check_resume_args(args, ckpt, ckpt_path)
        common.load_strict(model, ckpt["model"], ckpt_path)
        common.load_optimizer(opt, ckpt["optimizer"])
        step = ckpt["step"]
        proc.print(f"resumed from {ckpt_path} at step {step}")
    common.print_config(proc, args, lr=lr, total_steps=total_steps, world=proc.world, model=cfg, train=train.describe())

    # ---- compile, DDP ----
    raw = model
    if args.compile:
        model = common.compile_nnclr(model, args.compile_mode)
    model = common.ddp(model, proc)

    # ---- loop ----
    if proc.main:
        os.makedirs(args.out_dir, exist_ok=True)
    last_step = min(total_steps, args.max_steps or total_steps)
    log = common.Logger(proc, args.out_dir, total_steps, step, args.batch_size, args.log_every, last_step)
    save_every = args.save_every or steps_per_epoch
    gather = lambda x: common.gather(x, grad=True)
    model.train()  # the head; the frozen encoder stays in eval mode (VisionTransformer.freeze)
    while step < last_step:
        epoch = step // steps_per_epoch
        loader.set_epoch(epoch, start_batch=step % steps_per_epoch)
        batches = iter(loader)
        for _ in range(step % steps_per_epoch, steps_per_epoch):
            common.seed_step(args.seed, proc.rank, step)  # before the batch: its crops are random draws too
            idx, (v0, v1), labels = next(batches)
            cur_lr = common.lr_at(step, total_steps, warmup_steps, lr)
            common.set_lr(opt, cur_lr)
            with proc.autocast():
                loss, z0, nn_idx = model([v0, v1], idx, args.temperature, 1, gather, proc.rank)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            raw.queue.enqueue(common.gather(z0), common.gather(idx))  # after both lookups (the authors enqueue inside the loss: the same values)
            step += 1
            if log.due(step) or step % save_every == 0 or step == last_step:
                common.check_finite(loss.detach(), step, ckpt_path)
            if log.due(step):
                log(step, epoch=epoch, loss=loss.detach(), nn_acc=common.nn_accuracy(nn_idx, labels, train_labels),
                    lr=cur_lr)
            if step % save_every == 0 or step == last_step:
                common.save_on_main(proc, ckpt_path, stage="head", config=cfg, model=raw.state_dict(),
                                    optimizer=opt.state_dict(), step=step, epoch=epoch, seed=args.seed,
                                    args=common.args_dict(args))
            if step >= last_step:
                break
        if args.eval_every and step % steps_per_epoch == 0 and (epoch + 1) % args.eval_every == 0:
            log.event(step, epoch=epoch, **evaluate.knn_eval(raw.encoder, train, val, proc, args.pooling,
                                                             num_workers=args.num_workers))  # monitoring only
    common.finish_saves()
    proc.print(f"done: {step} steps, checkpoint at {ckpt_path}")


if __name__ == "__main__":
    common.main_guard(main)
