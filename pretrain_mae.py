"""Stage 1: MAE pre-training (He et al. 2022), the starting point of MAE-CT.

The encoder sees a random 25% of the patches; a light decoder predicts the normalised pixels of the other 75%.
Only the loss on masked patches counts. The result is a rich but not object-clustered feature (see stage 2/3).

    # CPU smoke run (~40 s on 2 cores): generated shapes, a ViT of 0.2M parameters (0.3M with the decoder)
    python pretrain_mae.py --dataset synthetic --model vit_nano --epochs 5 --out_dir runs/mae_smoke --device cpu
    # CIFAR-10, one GPU: ViT-T/4, 800 epochs (the data lives on the GPU, augmented there in batches)
    python pretrain_mae.py --dataset cifar10 --data_path data/ --model vit_tiny --epochs 800 --out_dir runs/mae_c10
    # ImageNet-100 (or ImageNet), 8 GPUs: ViT-B/16 at 224 px
    torchrun --standalone --nproc_per_node=8 pretrain_mae.py --dataset imagefolder --data_path /data/imagenet100 \\
        --model vit_base --patch_size 16 --img_size 224 --batch_size 1024 --epochs 800 --out_dir runs/mae_in100

    # Ablation (MAE-CT's third check, ablations.sh): MAE and NNCLR together from the start, loss = MAE + 1.0 * NNCLR
    python pretrain_mae.py --dataset synthetic --model vit_nano --epochs 5 --nnclr_weight 1 --out_dir runs/joint --device cpu

What to expect (measured, RESULTS.md and BENCHMARKS.md): `reproduce.sh smoke`'s 30 epochs take ~3.5-4 min on 2 idle
CPU cores (205-238 s, sessions 16-23). Fashion-MNIST, ViT-T/4, 100 epochs, batch 1024, --compile_mode
reduce-overhead on one H200: 221 s at ~79,000 img/s, about half of it compiling from a cold cache; its CLS token
then reaches k-NN@10 84-87 and k-means ACC 57-61 (raw pixels, issue 6's anchor: 86.6 / 54.9).

Writes OUT_DIR/ckpt.pt (stage "mae") every epoch, log.jsonl and recon_*.png (val images | masked | output).
Kill it at any time and rerun with --resume: the run continues as if never interrupted.
"""
import os

import torch

import common
import data
import evaluate
from model import PRESETS, JointMAE, MaskedAutoencoder, init_weights, model_config


def parse_args(argv=None):
    p = common.ArgumentParser(__doc__)
    common.add_common_args(p, epochs=800, batch_size=1024, blr=1.5e-4, warmup_frac=0.05, out_dir="runs/mae",
                           warmup_source="facebookresearch/mae; the MAE-CT authors warm up 20 epochs")
    g = p.add_argument_group("MAE")
    g.add_argument("--model", default="vit_tiny", choices=list(PRESETS), help="size preset (model.PRESETS); vit_nano for CPU smoke runs")
    g.add_argument("--patch_size", type=common.POSITIVE_INT, default=None, help="patch side (default: 4 for images <= 64 px, else 16)")
    g.add_argument("--mask_ratio", type=common.OPEN_FRACTION, default=0.75, help="fraction of patches removed (MAE: 0.75)")
    g.add_argument("--num_views", type=common.POSITIVE_INT, default=1, help="views per image per step (the MAE-CT authors use 2; lr counts views)")
    g.add_argument("--weight_decay", type=common.NON_NEGATIVE, default=0.05, help="AdamW weight decay on matrices (none on biases, norms, tokens)")
    g.add_argument("--no_norm_pix_loss", action="store_true", help="regress raw pixels instead of per-patch normalised ones")
    g.add_argument("--pictures", type=common.COUNT, default=10, help="save a reconstruction grid of val images every N epochs and at the end (0: never)")
    g.add_argument("--compile_mode", default="default", choices=["default", "reduce-overhead"],
                   help="torch.compile mode; reduce-overhead replays the step as CUDA graphs: 1.7x the images/s of ViT-T on 28 px (BENCHMARKS.md), whose step is bound by the host. Plain MAE only")
    g = p.add_argument_group("joint MAE + NNCLR (an ablation; 0 = plain MAE)")
    g.add_argument("--nnclr_weight", type=common.NON_NEGATIVE, default=0.0, help="lambda: train MAE + lambda * NNCLR from the start on two views per image (MAE-CT's ablation; the paper's recipe is MAE, then init_head.py, then contrastive_tune.py). 0: plain MAE, no NNCLR part is built")
    g.add_argument("--queue_size", type=common.POSITIVE_INT, default=None, help="NNCLR queue length, a multiple of the global batch (default: min(65536, train size) rounded down to one)")
    g.add_argument("--temperature", type=common.POSITIVE, default=0.15, help="softmax temperature of the NNCLR loss")
    g.add_argument("--proj_hidden", type=common.POSITIVE_INT, default=2048, help="projector hidden width")
    g.add_argument("--proj_dim", type=common.POSITIVE_INT, default=256, help="embedding width (projector output, queue entries)")
    g.add_argument("--pred_hidden", type=common.POSITIVE_INT, default=4096, help="predictor hidden width")
    g.add_argument("--head_weight_decay", type=common.NON_NEGATIVE, default=1e-5, help="AdamW weight decay of the NNCLR head")
    return p.parse_args(argv)


def main():
    args = parse_args()
    data.check_dataset(args.dataset)
    args.img_size = args.img_size or data.default_img_size(args.dataset, args.data_path)
    args.patch_size = args.patch_size or (4 if args.img_size <= 64 else 16)
    try:
        cfg = model_config(args.model, args.img_size, args.patch_size, data.num_channels(args.dataset))
    except ValueError as e:
        raise common.UserError(str(e))
    joint = args.nnclr_weight > 0
    if joint:
        args.num_views = 2  # NNCLR needs two views of each image; the MAE loss then covers both
        if args.compile_mode != "default":
            raise common.UserError("--compile_mode reduce-overhead is for the plain MAE (--nnclr_weight 0) only")
    ckpt_path = common.checkpoint_path(args)

    # ---- process ----
    proc = common.setup(args)
    local_batch = args.batch_size // proc.world

    # ---- data ----
    train = data.load_split(args.dataset, args.data_path, "train", args.img_size, args.data_on_gpu, args.seed)
    val = data.load_split(args.dataset, args.data_path, "val", args.img_size, args.data_on_gpu, args.seed)
    common.check_batch(args.batch_size, len(train))
    if args.eval_every:
        common.check_per_rank(len(val), "val", proc.world)  # its k-NN deals it out to the ranks
    if joint:
        common.check_queue(args, len(train))
        train_labels = train.labels.to(proc.device)  # for the nn_acc diagnostic only
    loader = data.ViewLoader(train, local_batch, "mae", args.num_views, args.img_size, proc.device, proc.rank,
                             proc.world, args.seed, num_workers=args.num_workers)
    steps_per_epoch = len(loader)
    total_steps = args.epochs * steps_per_epoch
    warmup_steps = int(args.warmup_epochs * steps_per_epoch)

    # ---- model ----
    model = mae = MaskedAutoencoder(**cfg, norm_pix_loss=not args.no_norm_pix_loss)
    init_weights(model)
    if joint:  # after the MAE init, so the MAE starts as a plain run of this seed; the head as stage 2's (torch init)
        model = JointMAE(mae, args.queue_size, cfg["pooling"], args.proj_hidden, args.proj_dim, args.pred_hidden)
    model.to(proc.device)

    # ---- optimiser: lr = blr * views per step / 256 ----
    lr = args.blr * args.batch_size * args.num_views / 256
    groups = common.decay_groups(mae.named_parameters(), args.weight_decay)
    if joint:  # one loss, one optimiser; the head at the same lr with its own (stage-2) weight decay
        groups += common.decay_groups(model.head.named_parameters(), args.head_weight_decay)
    opt = common.adamw(groups, common.BETAS, proc.device)
    step = 0
    if common.want_resume(args, ckpt_path):
        ckpt = common.load_checkpoint(ckpt_path, stages=["mae"])
        if joint != ("nnclr_head" in ckpt):
            raise common.UserError(f"{ckpt_path} was {'not ' if joint else ''}trained with --nnclr_weight > 0; resume it with the same setting")
        common.check_resume_args(args, ckpt, ckpt_path)
        common.load_strict(mae, ckpt["model"], ckpt_path)
        if joint:  # head and queue live under their own key, so the "model" entry stays a plain MAE
            common.load_strict(model, {**{"mae." + k: v for k, v in ckpt["model"].items()}, **ckpt["nnclr_head"]}, ckpt_path)
        common.load_optimizer(opt, ckpt["optimizer"])
        step = ckpt["step"]
        proc.print(f"resumed from {ckpt_path} at step {step}")
    n_params = sum(p.numel() for p in model.parameters())
    common.print_config(proc, args, lr=lr, total_steps=total_steps, params=n_params, world=proc.world,
                        train=train.describe(), val=val.describe())

    # ---- compile, DDP ----
    raw = model
    if args.compile:
        model = torch.compile(model, mode=args.compile_mode)  # masks come as input (noise): the same in every mode
    model = common.ddp(model, proc)

    # ---- loop ----
    if proc.main:
        os.makedirs(args.out_dir, exist_ok=True)
    last_step = min(total_steps, args.max_steps or total_steps)
    log = common.Logger(proc, args.out_dir, total_steps, step, args.batch_size, args.log_every, last_step)
    save_every = args.save_every or steps_per_epoch
    gather = lambda x: common.gather(x, grad=True)
    model.train()
    while step < last_step:
        epoch = step // steps_per_epoch
        loader.set_epoch(epoch, start_batch=step % steps_per_epoch)
        batches = iter(loader)
        for _ in range(step % steps_per_epoch, steps_per_epoch):
            common.seed_step(args.seed, proc.rank, step)  # before the batch: its crops are random draws too
            idx, views, labels = next(batches)
            cur_lr = common.lr_at(step, total_steps, warmup_steps, lr)
            common.set_lr(opt, cur_lr)
            # the masks, drawn eagerly: the same in every compile mode (inductor has its own random stream)
            noise = torch.rand(len(views) * len(idx), mae.grid ** 2, device=proc.device)  # (V*B, L)
            if joint:
                with proc.autocast():
                    mae_loss, nnclr_loss, z0, nn_idx = model(views, idx, args.mask_ratio, args.temperature, gather,
                                                           proc.rank, noise=noise)
                loss = mae_loss + args.nnclr_weight * nnclr_loss
            else:
                imgs = torch.cat(views) if len(views) > 1 else views[0]  # (V*B, C, H, W)
                with proc.autocast():
                    loss, _, _ = model(imgs, mask_ratio=args.mask_ratio, noise=noise)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if joint:
                raw.queue.enqueue(common.gather(z0), common.gather(idx))  # after both lookups, as stage 2
            step += 1
            if log.due(step) or step % save_every == 0 or step == last_step:
                common.check_finite(loss.detach(), step, ckpt_path)
            if not joint:
                log(step, epoch=epoch, loss=loss.detach(), lr=cur_lr)
            elif log.due(step):  # both parts separately; nn_acc: how often the neighbour has the query's label
                log(step, epoch=epoch, loss=loss.detach(), mae_loss=mae_loss.detach(), nnclr_loss=nnclr_loss.detach(),
                    nn_acc=common.nn_accuracy(nn_idx, labels, train_labels), lr=cur_lr)
            if step % save_every == 0 or step == last_step:
                save(proc, args, raw, opt, step, epoch, cfg, ckpt_path)
            if step >= last_step:
                break
        if args.eval_every and step % steps_per_epoch == 0 and (epoch + 1) % args.eval_every == 0:
            log.event(step, epoch=epoch, **evaluate.knn_eval(mae, train, val, proc, cfg["pooling"],
                                                             num_workers=args.num_workers))  # monitoring only
        if args.pictures and proc.main and ((epoch + 1) % args.pictures == 0 or step == last_step):
            save_reconstructions(mae, val, args, proc, os.path.join(args.out_dir, f"recon_ep{epoch:04d}.png"))
    common.finish_saves()
    proc.print(f"done: {step} steps, checkpoint at {ckpt_path}")


def save(proc, args, raw, opt, step, epoch, cfg, path):
    """"model" is always the plain MaskedAutoencoder state dict (init_head.py loads it strictly); a joint run
    adds its NNCLR head and queue under "nnclr_head" (JointMAE keys without the "mae." ones)."""
    joint = args.nnclr_weight > 0
    extra = dict(nnclr_head={k: v for k, v in raw.state_dict().items() if not k.startswith("mae.")}) if joint else {}
    common.save_on_main(proc, path, stage="mae", config=cfg, model=(raw.mae if joint else raw).state_dict(),
                        optimizer=opt.state_dict(), step=step, epoch=epoch, seed=args.seed,
                        args=common.args_dict(args), **extra)


@torch.no_grad()
def save_reconstructions(model, val, args, proc, path, n=8):
    """A grid of rows: val image | masked input | reconstruction with the visible patches pasted back."""
    from torchvision.utils import save_image  # here, not at the top: a 3-second import on a slow CPU, for a picture
    model.eval()
    loader = data.ViewLoader(val, n, "eval", 1, args.img_size, proc.device, shuffle=False, drop_last=False, num_workers=0)
    imgs = next(iter(loader))[1][0]  # (n, C, H, W), normalised
    torch.manual_seed(args.seed)
    with proc.autocast():
        _, pred, mask = model(imgs, mask_ratio=args.mask_ratio)
    pred = pred.float()
    if model.norm_pix_loss:  # undo the per-patch normalisation with the true patch statistics
        target = model.patchify(imgs)
        pred = pred * (target.var(-1, keepdim=True) + 1e-6) ** 0.5 + target.mean(-1, keepdim=True)
    mask_img = model.unpatchify(mask.unsqueeze(-1).expand(-1, -1, pred.shape[-1]))  # 1 = masked, (n, C, H, W)
    recon = model.unpatchify(pred) * mask_img + imgs * (1 - mask_img)
    mean = torch.tensor(val.mean, device=imgs.device).view(1, -1, 1, 1)
    std = torch.tensor(val.std, device=imgs.device).view(1, -1, 1, 1)
    rows = [t * std + mean for t in (imgs, imgs * (1 - mask_img), recon)]
    save_image(torch.cat(rows).clamp(0, 1), path, nrow=n)
    model.train()


if __name__ == "__main__":
    common.main_guard(main)
