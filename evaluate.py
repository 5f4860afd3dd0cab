"""Evaluate a frozen encoder of any stage: k-NN, linear probe, k-means clustering and low-shot classification.

Features are extracted once (encoder in eval mode, no augmentation, autocast), gathered over all processes in
dataset order, and every metric then runs on the stored features, so even the linear probe takes seconds to
minutes. A stage-1 MAE or a file of official weights (facebookresearch/mae's, the MAE-CT authors' released
encoders, a bare state dict) is evaluated with BOTH poolings (CLS token and mean of patch tokens); a stage-2/3
checkpoint with the pooling its head was trained on.

    # CPU smoke run on generated shapes (vit_nano: ~20 s; see the OMP note below)
    OMP_NUM_THREADS=1 python evaluate.py --init_from runs/mae_smoke/ckpt.pt --dataset synthetic --device cpu
    # CIFAR-10, one GPU (the checkpoint's dataset and data path are the defaults)
    python evaluate.py --init_from runs/ct_c10/ckpt.pt
    # the EMA encoder of a stage-3 run trained with contrastive_tune.py --encoder_ema 0.9999
    python evaluate.py --init_from runs/ct_ema/ckpt.pt --encoder_ema
    # ImageNet, 8 GPUs (extraction is sharded; the metrics run on every rank, rank 0 writes)
    torchrun --standalone --nproc_per_node=8 evaluate.py --init_from mae_pretrain_vit_base.pth --dataset imagefolder \\
        --data_path /data/imagenet --img_size 224 --probe_batch 4096

What to expect: a trained encoder beats a random one on every metric; MAE features are good for the linear probe but
poor for k-NN and k-means, and contrastive tuning raises the latter most (SPEC: ViT-B/16 on ImageNet, MAE 66.7 /
51.1 -> MAE-CT 73.5 / 64.1 linear / k-NN). Our probe trains on stored features without augmentation (fast); the
paper's probe trains 50 epochs with crop + flip, so expect it a little lower. As in DINO's and MAE's sweeps, the
probe lr is picked on the val split. Time (session 24, 2-core CPU): vit_nano on cifar10-5k (4000 + 1000 images, all
metrics, defaults) takes ~14 s on idle cores (18 s with the imports); the generated set ~16 s (20 s) with
OMP_NUM_THREADS=1. OMP note: the metrics are many small tensor ops; beside two busy processes, that cifar10-5k run
took 91 s with the default threads and 31 s with OMP_NUM_THREADS=1 (an early session saw 450 s against 9 s).

OUT_DIR/results.json (all numbers in percent; the keys below always appear, null for a metric that was not run,
except nmi_best, ari_best, lowshot_N_std and extra knnK, which appear only with their metric):
    knn10, knn20        k-NN accuracy, k = 10 (authors' code: their in-training k-NN, standardised as here; their
                        stand-alone eval_knn.py takes k = 20 on L2-normalised features only) and 20 (DINO); other
                        --knn_k values add knnK
    linear, linear_lr   best linear-probe val accuracy over --probe_lrs, and the lr that reached it
    kmeans_acc_mean     k-means (fit on train, k = classes) val cluster accuracy, mean over --kmeans_seeds
    kmeans_acc_best     the same, the best seed; nmi, ari: mean over seeds; nmi_best, ari_best: the best seed's
    lowshot_1/2/5       logistic regression on 1/2/5 labelled train images per class, mean of 3 fixed splits
                        (lowshot_N_std: their standard deviation)
    pct1, pct10         linear probe trained on 1% / 10% of the train labels (class-balanced, fixed split; the
                        authors use logistic regression on the SimCLRv2 / MSN ImageNet splits, so compare with care)
    dataset, checkpoint, stage, pooling, features, feature_dim, seconds, and what was measured on: num_classes,
                        n_train, n_val (images)
With two poolings, results["cls"] and results["mean"] hold one set each; the top-level keys repeat the one
the paper uses for that model size (model.PRESETS). Pictures: knn_grid.png (each row: a val query, then its
nearest training images, framed green when the class matches, red when not) and clusters.png (10 random val
images of each of the 16 largest clusters of the best k-means run).
"""
import copy
import dataclasses
import json
import math
import os
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import common
import data
from model import PRESETS, NNCLRHead, VisionTransformer, encoder_state_dict, pool

METRICS = ("knn", "linear", "kmeans", "lowshot", "pictures")
KEYS = ("knn10", "knn20", "linear", "linear_lr", "kmeans_acc_mean", "kmeans_acc_best", "nmi", "ari",
        "lowshot_1", "lowshot_2", "lowshot_5", "pct1", "pct10")


def parse_args(argv=None):
    p = common.ArgumentParser(__doc__)
    g = p.add_argument_group("what to evaluate")
    g.add_argument("--init_from", required=True, help="checkpoint of any stage (ckpt.pt), an official MAE .pth, or the MAE-CT authors' released encoder "
                   "(maect_base16.th, README)")
    common.add_num_heads_arg(g)
    g.add_argument("--dataset", default=None, help=f"{' | '.join(data.DATASETS)} (default: the one the checkpoint was trained on)")
    g.add_argument("--data_path", default=None, help="dataset root (default: the checkpoint's, when --dataset is its dataset too)")
    g.add_argument("--img_size", type=common.POSITIVE_INT, default=None, help="input side (default and only valid value: the checkpoint's)")
    g.add_argument("--pooling", default=None, choices=["mean", "cls"], help="encoder feature (default: the head's pooling; both for stage-1 and official checkpoints)")
    g.add_argument("--features", default="encoder", choices=["encoder", "projector", "predictor"], help="which output to evaluate; projector/predictor need a stage-2/3 checkpoint")
    g.add_argument("--encoder_ema", action="store_true", help="evaluate the EMA encoder weights of a stage-3 run (the paper's numbers most likely are)")
    g.add_argument("--metrics", default=",".join(METRICS), help="comma list of knn,linear,kmeans,lowshot,pictures; drop the slow ones for quick looks")
    g = p.add_argument_group("metric settings")
    g.add_argument("--knn_k", type=common.POSITIVE_INT, nargs="+", default=[10, 20], help="neighbour counts for k-NN (10: authors, 20: DINO)")
    g.add_argument("--kmeans_seeds", type=common.POSITIVE_INT, default=10, help="k-means restarts; mean and best are reported (fewer for quick runs)")
    g.add_argument("--probe_epochs", type=common.POSITIVE_INT, default=100, help="linear-probe epochs over the stored features")
    g.add_argument("--probe_lrs", type=common.POSITIVE, nargs="+", default=[0.01, 0.03, 0.1, 0.3, 1.0, 3.0], help="learning rates trained side by side; the best val accuracy is reported")
    g.add_argument("--probe_batch", type=common.POSITIVE_INT, default=256, help="linear-probe batch; raise (e.g. 4096) on ImageNet-size sets for speed")
    g.add_argument("--lowshot_l2", type=common.NON_NEGATIVE, default=1e-3, help="L2 penalty of the low-shot logistic regression (larger: closer to a class-mean classifier)")
    g.add_argument("--chunk", type=common.POSITIVE_INT, default=256, help="queries per k-NN similarity block (chunk x train-set floats); lower it if that does not fit")
    g = p.add_argument_group("run")
    g.add_argument("--batch_size", type=common.POSITIVE_INT, default=256, help="GLOBAL batch for feature extraction (no gradients: raise it for speed)")
    g.add_argument("--out_dir", default=None, help="where results.json and pictures go (default: the checkpoint's folder/eval)")
    g.add_argument("--device", default=None, help="cuda | cpu (default: cuda when available)")
    g.add_argument("--precision", default=None, choices=["bf16", "fp32"], help="autocast dtype for extraction (default: bf16 on CUDA, fp32 on CPU)")
    g.add_argument("--num_workers", type=common.COUNT, default=8, help="DataLoader workers per process (file-backed datasets only)")
    g.add_argument("--seed", type=int, default=0, help="seed of k-means, the probe init and the pictures (low-shot splits are fixed); with "
                   "--dataset synthetic also of the generated images: give the training run's")
    return p.parse_args(argv)


# ---- features ----
PROGRESS_EVERY = 30  # seconds between extract_features' progress lines


@torch.no_grad()
def extract_features(fn, imageset, img_size, proc, batch_size=256, num_workers=4, desc=None):
    """fn(images) -> (B, D) on every image of `imageset`, un-augmented; returns (feats float32 (N, D), labels
    (N,)) on proc.device in dataset order, on every rank. Rank r sees images r, r+W, r+2W, ... (the loader's
    sharding); the shards, padded to equal length, are all-gathered and scattered back by their indices.
    With desc, a progress line every 30 s (ImageNet's train set takes minutes)."""
    common.check_per_rank(len(imageset), desc or "a split", proc.world)  # (main and the stages check it up front)
    loader = data.ViewLoader(imageset, max(1, batch_size // proc.world), "eval", 1, img_size, proc.device,
                             proc.rank, proc.world, shuffle=False, drop_last=False, num_workers=num_workers)
    idxs, feats = [], []
    n = len(imageset)
    t0 = shown = time.time()
    for idx, (x,), _ in loader:
        with proc.autocast():
            feats.append(fn(x).float())
        idxs.append(idx)
        if desc and time.time() - shown > PROGRESS_EVERY:
            done = min(n, sum(map(len, idxs)) * proc.world)  # about: this rank's count times the ranks
            rate = done / (time.time() - t0)
            proc.print(f"{desc}: {done}/{n} images | {rate:,.0f} img/s | ETA {(n - done) / rate / 60:.1f} min")
            shown = time.time()
    idx, f = torch.cat(idxs), torch.cat(feats)  # (n_r,), (n_r, D)
    del feats  # ImageNet's features are gigabytes: no copy kept longer than needed
    if proc.world > 1:  # all_gather needs equal shapes: rank 0 holds the most, ceil(N / W)
        pad = math.ceil(n / proc.world) - len(idx)
        idx, f = torch.cat([idx, idx.new_full((pad,), -1)]), torch.cat([f, f.new_zeros(pad, f.shape[1])])
        idx, f = common.gather(idx), common.gather(f)  # (W * ceil(N/W),), (W * ceil(N/W), D)
    keep = idx >= 0
    if int(keep.sum()) != n:
        raise RuntimeError(f"feature extraction saw {int(keep.sum())} of {n} images")
    out = f.new_empty(n + 1, f.shape[1])  # the padding rows (index -1) go to a spare last row: no f[keep] copy
    out[torch.where(keep, idx, n)] = f
    return out[:n], imageset.labels.to(proc.device)


def standardise(train_f, *others):
    """Subtract the train mean, divide by the train std, then L2-normalise (k-NN, k-means, low-shot)."""
    mean, std = train_f.mean(0), train_f.std(0) + 1e-6
    return tuple(F.normalize((x - mean) / std, dim=1) for x in (train_f, *others))


def accuracy(pred, y):
    return 100.0 * (pred == y).float().mean().item()


# ---- k-NN ----
@torch.no_grad()
def knn_predict(train_f, train_y, test_f, k, num_classes, T=0.07, chunk=256):
    """Weighted k-NN (Wu et al. 2018; DINO): each of the k most cosine-similar train features votes for its
    class with weight exp(sim / T). Inputs are L2-normalised; queries go in chunks of `chunk`, so only a
    (chunk, N_train) similarity block is ever held. Returns predicted labels (M,)."""
    preds = []
    for q in test_f.split(chunk):
        sim = q @ train_f.T  # (c, N_train), fp32
        top_sim, top_i = sim.topk(k, dim=1)  # (c, k)
        votes = torch.zeros(q.shape[0], num_classes, device=q.device)
        votes.scatter_add_(1, train_y[top_i], (top_sim / T).exp())  # (c, C)
        preds.append(votes.argmax(dim=1))
    return torch.cat(preds)


def knn_eval(encoder, train, val, proc, pooling="mean", ks=(10, 20), batch_size=256, num_workers=4):
    """k-NN accuracy (percent) of a raw ViT on val, for the training scripts' --eval_every. All ranks must call
    it; the encoder's train/eval mode is restored. Returns {"knn10": ..., "knn20": ...}."""
    was_training = encoder.training
    encoder.eval()
    try:  # forward_features: also right for a MaskedAutoencoder, whose forward() is the MAE loss
        fn = lambda x: pool(encoder.forward_features(x), pooling)
        img_size = encoder.grid * encoder.patch_size
        tr, ytr = extract_features(fn, train, img_size, proc, batch_size, num_workers)
        va, yva = extract_features(fn, val, img_size, proc, batch_size, num_workers)
    finally:
        encoder.train(was_training)
    tr, va = standardise(tr, va)
    return {f"knn{k}": accuracy(knn_predict(tr, ytr, va, k, len(train.classes)), yva) for k in ks}


# ---- linear probe ----
def linear_probe(train_f, train_y, val_f, val_y, num_classes, lrs, epochs, batch_size=256, seed=0):
    """BatchNorm1d(affine=False) + Linear trained with SGD (momentum 0.9, wd 0, 10% warm-up + cosine) on
    stored features, one head per lr, all at once: weights (n_lr, D, C), one einsum per step. The gradient
    of the mean cross-entropy is written out (softmax - one-hot). Returns val accuracy (percent) per lr."""
    dev, (n, d), n_lr = train_f.device, train_f.shape, len(lrs)
    g = torch.Generator(device=dev).manual_seed(seed)
    bn = nn.BatchNorm1d(d, affine=False).to(dev)  # no parameters: shared by every head
    W = torch.randn(n_lr, d, num_classes, generator=g, device=dev) * 0.01  # (n_lr, D, C)
    b = torch.zeros(n_lr, 1, num_classes, device=dev)
    mW, mb = torch.zeros_like(W), torch.zeros_like(b)  # momentum buffers
    lr = torch.tensor(lrs, device=dev).view(n_lr, 1, 1)
    bs = min(batch_size, n)
    steps = n // bs  # drop the last partial batch: a batch of one has no BatchNorm statistics
    total, step = epochs * steps, 0
    with torch.no_grad():
        for _ in range(epochs):
            perm = torch.randperm(n, generator=g, device=dev)
            for s in range(steps):
                i = perm[s * bs:(s + 1) * bs]
                x = bn(train_f[i])  # (B, D), batch statistics (bn in train mode)
                p = torch.softmax(torch.einsum("bd,ldc->lbc", x, W) + b, dim=-1)  # (n_lr, B, C)
                p[:, torch.arange(bs, device=dev), train_y[i]] -= 1  # d loss / d logits * B
                mW.mul_(0.9).add_(torch.einsum("bd,lbc->ldc", x, p) / bs)
                mb.mul_(0.9).add_(p.mean(dim=1, keepdim=True))
                scale = common.lr_at(step, total, int(0.1 * total), 1.0)
                W.sub_(scale * lr * mW)
                b.sub_(scale * lr * mb)
                step += 1
        bn.eval()  # running statistics at test time
        correct = torch.zeros(n_lr, device=dev)
        for x, y in zip(val_f.split(4096), val_y.split(4096)):
            pred = (torch.einsum("bd,ldc->lbc", bn(x), W) + b).argmax(dim=-1)  # (n_lr, b)
            correct += (pred == y).float().sum(dim=1)
    return (100.0 * correct / len(val_y)).tolist()


# ---- low-shot ----
def fewshot_indices(labels, per_class, seed):
    """Sorted indices of a class-balanced labelled subset, fixed by `seed`: `per_class` images of every
    class (int; all of them if a class has fewer), or that fraction of every class (float < 1, >= 1 image)."""
    labels = labels.cpu()
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    order = order[torch.sort(labels[order], stable=True).indices]  # grouped by class, random within a class
    counts = torch.bincount(labels)
    rank = torch.arange(len(labels)) - (counts.cumsum(0) - counts)[labels[order]]  # position within its class
    if isinstance(per_class, int):
        quota = torch.full_like(counts, per_class)
    else:
        quota = (counts * per_class).round().clamp(min=1).long()
    return order[rank < quota[labels[order]]].sort().values


def logistic_regression(train_f, train_y, test_f, num_classes, l2, iters=200):
    """Multinomial logistic regression, mean cross-entropy + l2/2 |W|^2, fit full-batch with L-BFGS (the
    problem is convex, so this is the exact optimum up to tolerance). Returns predicted labels of test_f."""
    W = torch.zeros(train_f.shape[1], num_classes, device=train_f.device, requires_grad=True)
    b = torch.zeros(num_classes, device=train_f.device, requires_grad=True)
    opt = torch.optim.LBFGS([W, b], lr=1, max_iter=iters, history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(train_f @ W + b, train_y) + l2 / 2 * (W ** 2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return (test_f @ W + b).argmax(dim=1).detach()


# ---- clustering ----
def nearest(x, centres, chunk=65536):
    """Index of the nearest centre (Euclidean) of every row of x, in blocks of `chunk` rows."""
    c2 = (centres ** 2).sum(1)
    return torch.cat([(c2 - 2 * q @ centres.T).argmin(dim=1) for q in x.split(chunk)])  # |q|^2 is constant


@torch.no_grad()
def kmeans(x, k, seed, iters=100):
    """Lloyd's k-means with k-means++ seeding (Arthur & Vassilvitskii 2007): each next centre is drawn with
    probability proportional to the squared distance to the nearest centre so far. An empty cluster keeps
    its old centre. Returns (centres (k, D), assignment (N,))."""
    g = torch.Generator(device=x.device).manual_seed(seed)
    centres = x[torch.randint(len(x), (1,), generator=g, device=x.device)]  # (1, D)
    d2 = ((x - centres) ** 2).sum(1)  # (N,) squared distance to the nearest centre
    for _ in range(k - 1):
        c = x[torch.multinomial(d2.clamp(min=1e-12), 1, generator=g)]  # (1, D)
        centres = torch.cat([centres, c])
        d2 = torch.minimum(d2, ((x - c) ** 2).sum(1))
    assign = nearest(x, centres)
    for _ in range(iters):
        counts = torch.bincount(assign, minlength=k)[:, None]  # (k, 1)
        sums = torch.zeros_like(centres).index_add_(0, assign, x)  # (k, D)
        centres = torch.where(counts > 0, sums / counts.clamp(min=1), centres)
        new = nearest(x, centres)
        if torch.equal(new, assign):
            break
        assign = new
    return centres, assign


def hungarian(cost):
    """Minimum-cost assignment (Kuhn-Munkres with potentials, O(n^2 m)) of a (n, m) cost matrix: every row of
    the smaller side gets its own column. Returns (rows, cols) sorted by row, as scipy's linear_sum_assignment."""
    cost = np.asarray(cost, dtype=np.float64)
    if cost.shape[0] > cost.shape[1]:  # the algorithm wants n <= m
        cols, rows = hungarian(cost.T)
        order = np.argsort(rows)
        return rows[order], cols[order]
    n, m = cost.shape
    u, v = np.zeros(n + 1), np.zeros(m + 1)  # potentials; 1-based, column 0 is a virtual start
    match = np.zeros(m + 1, dtype=np.int64)  # match[j] = row holding column j (0: free)
    way = np.zeros(m + 1, dtype=np.int64)  # previous column on the shortest augmenting path
    for i in range(1, n + 1):
        match[0], j0 = i, 0
        minv, used = np.full(m + 1, np.inf), np.zeros(m + 1, dtype=bool)
        while match[j0] != 0:  # Dijkstra-like growth of the alternating tree until a free column is reached
            used[j0] = True
            i0 = match[j0]
            reduced = cost[i0 - 1] - u[i0] - v[1:]  # reduced costs of row i0 to every column
            better = ~used[1:] & (reduced < minv[1:])
            minv[1:][better], way[1:][better] = reduced[better], j0
            free_minv = np.where(used[1:], np.inf, minv[1:])
            j1 = int(np.argmin(free_minv)) + 1
            delta = free_minv[j1 - 1]
            u[match[used]] += delta  # keep reduced costs >= 0 on the tree, tight on its edges
            v[used] -= delta
            minv[~used] -= delta
            j0 = j1
        while j0:  # flip the augmenting path
            j1 = way[j0]
            match[j0] = match[j1]
            j0 = j1
    cols = np.nonzero(match[1:])[0]
    rows = match[1:][cols] - 1
    order = np.argsort(rows)
    return rows[order], cols[order]


def _contingency(a, b):
    """(n_a, n_b) counts of samples with label pair (a, b); labels may be any integers."""
    a, b = (np.asarray(t.cpu() if torch.is_tensor(t) else t).ravel() for t in (a, b))
    _, ai = np.unique(a, return_inverse=True)
    _, bi = np.unique(b, return_inverse=True)
    na, nb = ai.max() + 1, bi.max() + 1
    return np.bincount(ai * nb + bi, minlength=na * nb).reshape(na, nb)


def cluster_acc(y_true, y_pred):
    """Accuracy after the best one-to-one matching of clusters to classes (Hungarian on the confusion)."""
    c = _contingency(y_pred, y_true)  # (clusters, classes)
    rows, cols = hungarian(-c)
    return c[rows, cols].sum() / c.sum()


def nmi(a, b):
    """Normalised mutual information, arithmetic-mean normalisation (sklearn's default)."""
    c = _contingency(a, b)
    p = c / c.sum()
    if p.shape[0] == p.shape[1] == 1:
        return 1.0  # both labelings put everything in one group: identical
    pa, pb = p.sum(1), p.sum(0)
    nz = p > 0
    mi = (p[nz] * np.log(p[nz] / np.outer(pa, pb)[nz])).sum()
    h = lambda q: -(q * np.log(q)).sum()
    return float(max(mi, 0.0) / max((h(pa) + h(pb)) / 2, 1e-15))


def ari(a, b):
    """Adjusted Rand index (Hubert & Arabie 1985): pair-counting agreement, 0 for chance, 1 for identical."""
    c = _contingency(a, b).astype(np.float64)
    pairs = lambda x: x * (x - 1) / 2
    index, sa, sb = pairs(c).sum(), pairs(c.sum(1)).sum(), pairs(c.sum(0)).sum()
    expected, maximum = sa * sb / pairs(c.sum()), (sa + sb) / 2
    return 1.0 if maximum == expected else float((index - expected) / (maximum - expected))


# ---- all metrics on one set of features ----
def run_metrics(tr, ytr, va, yva, num_classes, args, metrics, say=None):
    """Every selected metric on raw train/val features -> (results dict, best k-means val assignment).
    say(line), if given, hears how long each metric took (on ImageNet-size sets, minutes each)."""
    res, best_assign = dict.fromkeys(KEYS), None
    trn, van = standardise(tr, va)
    t = time.time()

    def took(what):
        nonlocal t
        if say:
            say(f"  {what}: {time.time() - t:.1f} s")
        t = time.time()

    if "knn" in metrics:
        for k in args.knn_k:
            res[f"knn{k}"] = accuracy(knn_predict(trn, ytr, van, k, num_classes, chunk=args.chunk), yva)
        took("k-NN")
    if "linear" in metrics:  # the probe's BatchNorm standardises, so it takes the raw features
        probe = lambda i: linear_probe(tr[i], ytr[i], va, yva, num_classes, args.probe_lrs, args.probe_epochs,
                                       args.probe_batch, args.seed)
        accs = probe(torch.arange(len(ytr), device=ytr.device))
        best = int(np.argmax(accs))
        res["linear"], res["linear_lr"] = accs[best], args.probe_lrs[best]
        for frac, key in ((0.01, "pct1"), (0.1, "pct10")):
            res[key] = max(probe(fewshot_indices(ytr, frac, seed=0).to(ytr.device)))
        took("linear probe (all, 1%, 10% of the labels)")
    if "kmeans" in metrics:  # fit on train, score the val assignment
        runs = []
        for s in range(args.kmeans_seeds):
            centres, _ = kmeans(trn, num_classes, seed=args.seed + s)
            assign = nearest(van, centres)
            runs.append((100 * cluster_acc(yva, assign), 100 * nmi(yva, assign), 100 * ari(yva, assign), assign))
        best = max(range(len(runs)), key=lambda r: runs[r][0])
        res["kmeans_acc_mean"], res["kmeans_acc_best"] = float(np.mean([r[0] for r in runs])), float(runs[best][0])
        res["nmi"], res["ari"] = float(np.mean([r[1] for r in runs])), float(np.mean([r[2] for r in runs]))
        res["nmi_best"], res["ari_best"], best_assign = float(runs[best][1]), float(runs[best][2]), runs[best][3]
        took(f"k-means ({args.kmeans_seeds} seeds)")
    if "lowshot" in metrics:  # three fixed splits per shot count, the same for every model
        for shots in (1, 2, 5):
            accs = []
            for split in range(3):
                i = fewshot_indices(ytr, shots, seed=split).to(ytr.device)
                accs.append(accuracy(logistic_regression(trn[i], ytr[i], van, num_classes, args.lowshot_l2), yva))
            res[f"lowshot_{shots}"], res[f"lowshot_{shots}_std"] = float(np.mean(accs)), float(np.std(accs))
        took("low-shot")
    return res, best_assign


# ---- pictures ----
def load_images(imageset, indices, img_size):
    """The eval views of the given images, de-normalised to [0, 1] (n, C, S, S) on the CPU."""
    indices = indices.cpu()
    if imageset.images is not None:
        sub = dataclasses.replace(imageset, images=imageset.images[indices], labels=imageset.labels[indices])
    else:
        folder = copy.copy(imageset.folder)
        folder.samples = [imageset.folder.samples[i] for i in indices.tolist()]
        sub = dataclasses.replace(imageset, labels=imageset.labels[indices], folder=folder)
    x = next(iter(data.ViewLoader(sub, len(indices), "eval", 1, img_size, "cpu", shuffle=False, drop_last=False,
                                  num_workers=0)))[1][0]
    mean, std = (torch.tensor(t).view(1, -1, 1, 1) for t in (imageset.mean, imageset.std))
    return (x * std + mean).clamp(0, 1).expand(-1, 3, -1, -1).contiguous()  # grey -> RGB: coloured frames


def save_pictures(trn, ytr, van, yva, assign, train, val, args, n=8):
    from torchvision.utils import save_image  # here: importing torchvision costs a second at start-up
    g = torch.Generator().manual_seed(args.seed)
    queries = torch.randperm(len(yva), generator=g)[:n].to(van.device)
    k = min(10, len(trn))
    nbrs = (van[queries] @ trn.T).topk(k, dim=1).indices  # (n, k)
    imgs = load_images(train, nbrs.flatten(), args.img_size).view(len(queries), k, 3, args.img_size, args.img_size)
    same = (ytr[nbrs] == yva[queries][:, None]).cpu()  # (n, k)
    colour = torch.where(same[..., None], torch.tensor([0.0, 0.8, 0.0]), torch.tensor([0.9, 0.0, 0.0]))
    imgs[:, :, :, [0, -1], :] = colour[..., None, None]  # frame: top and bottom rows,
    imgs[:, :, :, :, [0, -1]] = colour[..., None, None]  # left and right columns
    grid = torch.cat([load_images(val, queries, args.img_size)[:, None], imgs], dim=1)  # (n, 1+k, 3, S, S)
    save_image(grid.flatten(0, 1), os.path.join(args.out_dir, "knn_grid.png"), nrow=1 + k)
    if assign is None:
        return
    sizes = torch.bincount(assign, minlength=len(train.classes))
    rows = []
    for c in sizes.argsort(descending=True)[:16].tolist():  # the 16 largest clusters, 10 random members each
        members = (assign == c).nonzero()[:, 0].cpu()
        pick = members[torch.randperm(len(members), generator=g)[:10]]
        tiles = load_images(val, pick, args.img_size) if len(pick) else torch.zeros(0, 3, args.img_size, args.img_size)
        rows.append(torch.cat([tiles, torch.zeros(10 - len(pick), *tiles.shape[1:])]))
    save_image(torch.cat(rows), os.path.join(args.out_dir, "clusters.png"), nrow=10)


# ---- main ----
def main():
    t0 = time.time()
    args = parse_args()
    args.compile = 0  # one forward pass per image: compiling would cost more than it saves
    metrics = [m for m in args.metrics.split(",") if m]
    if set(metrics) - set(METRICS):
        raise common.UserError(f"unknown --metrics {', '.join(sorted(set(metrics) - set(METRICS)))}; choose from {', '.join(METRICS)}")
    args.out_dir = args.out_dir or os.path.join(os.path.dirname(os.path.abspath(args.init_from)), "eval")
    common.check_out_dir(args.out_dir)
    ckpt = common.load_checkpoint(args.init_from, stages=["mae", "head", "ct", "official"])
    stage, ck_args = ckpt["stage"], ckpt.get("args", {})
    cfg, enc_sd = common.encoder_from_checkpoint(ckpt, args.init_from, args.num_heads)
    if args.encoder_ema:
        if "encoder_ema" not in ckpt:
            raise common.UserError(f"--encoder_ema, but {args.init_from} ({stage} stage) holds no encoder EMA "
                                   "(only stage-3 runs with an encoder EMA do)")
        enc_sd = encoder_state_dict(ckpt["encoder_ema"])
    if args.features != "encoder" and stage not in ("head", "ct"):
        raise common.UserError(f"--features {args.features} needs a stage-2/3 checkpoint; {args.init_from} is '{stage}'")
    data.input_data(args, ck_args, cfg, args.init_from)
    # Poolings: the head's for stage 2/3; both for an MAE, whose headline is the paper's choice for its size.
    poolings = [args.pooling or ck_args["pooling"]] if (args.pooling or stage in ("head", "ct")) else ["cls", "mean"]
    headline = poolings[0] if len(poolings) == 1 else PRESETS[cfg["model"]]["pooling"]

    # ---- process ----
    proc = common.setup(args)

    # ---- data ----
    train = data.load_split(args.dataset, args.data_path, "train", args.img_size, None, args.seed)
    val = data.load_split(args.dataset, args.data_path, "val", args.img_size, None, args.seed)
    if list(train.classes) != list(val.classes):
        raise common.UserError(f"train and val have different classes ({len(train.classes)} vs {len(val.classes)})")
    common.check_per_rank(len(train), "train", proc.world)
    common.check_per_rank(len(val), "val", proc.world)
    if max(args.knn_k) > len(train):
        raise common.UserError(f"--knn_k {max(args.knn_k)} is larger than the training set ({len(train)} images)")
    num_classes = len(train.classes)

    # ---- model: frozen encoder (and head) in eval mode ----
    encoder = VisionTransformer(**cfg)
    common.load_strict(encoder, enc_sd, args.init_from)
    encoder.to(proc.device).eval()
    head = None
    if args.features != "encoder":
        head = NNCLRHead(cfg["embed_dim"], ck_args["proj_hidden"], ck_args["proj_dim"], ck_args["pred_hidden"])
        common.load_strict(head, {k[5:]: v for k, v in ckpt["model"].items() if k.startswith("head.")}, args.init_from)
        head.to(proc.device).eval()  # BatchNorm with its running statistics
    common.print_config(proc, args, stage=stage, poolings=poolings, world=proc.world, model=cfg,
                        train=train.describe(), val=val.describe())

    def features(x):  # every pooling from one pass through the encoder: (B, P*D)
        tokens = encoder.forward_features(x)  # (B, 1+L, D)
        out = []
        for p in poolings:
            f = pool(tokens, p)
            if head is not None:
                f = head.projector(f)
                f = head.predictor(f) if args.features == "predictor" else f
            out.append(f.float())
        return torch.cat(out, dim=1)

    # ---- features, once ----
    t1 = time.time()
    tr_all, ytr = extract_features(features, train, args.img_size, proc, args.batch_size, args.num_workers, "train")
    va_all, yva = extract_features(features, val, args.img_size, proc, args.batch_size, args.num_workers, "val")
    dim = tr_all.shape[1] // len(poolings)
    proc.print(f"features: {len(train)} train + {len(val)} val images, dim {dim}, {time.time() - t1:.1f} s")

    # ---- metrics (identical on every rank, so no gathers; rank 0 writes) ----
    per_pool, assigns = {}, {}
    for i, p in enumerate(poolings):
        t1 = time.time()
        tr, va = tr_all[:, i * dim:(i + 1) * dim], va_all[:, i * dim:(i + 1) * dim]
        per_pool[p], assigns[p] = run_metrics(tr, ytr, va, yva, num_classes, args, metrics, say=proc.print)
        proc.print(f"metrics ({p} pooling): {time.time() - t1:.1f} s")

    # ---- output ----
    meta = dict(dataset=args.dataset, checkpoint=os.path.abspath(args.init_from), stage=stage, features=args.features,
                feature_dim=dim, num_classes=num_classes, n_train=len(train), n_val=len(val), encoder_ema=args.encoder_ema, seconds=round(time.time() - t0, 1))
    results = {**per_pool[headline], **meta, "pooling": headline}
    if len(poolings) > 1:
        results.update({p: {**per_pool[p], **meta, "pooling": p} for p in poolings})
    if proc.main:
        os.makedirs(args.out_dir, exist_ok=True)
        print(f"\n{'metric':<18}" + "".join(f"{p + ' pooling':>14}" for p in poolings))
        for k in per_pool[headline]:
            if per_pool[headline][k] is not None:
                print(f"{k:<18}" + "".join(f"{per_pool[p][k]:>14.4g}" for p in poolings))
        if "pictures" in metrics:
            h = poolings.index(headline)
            trn, van = standardise(tr_all[:, h * dim:(h + 1) * dim], va_all[:, h * dim:(h + 1) * dim])
            save_pictures(trn, ytr, van, yva, assigns[headline], train, val, args)
        path = os.path.join(args.out_dir, "results.json")
        with open(path + ".tmp", "w") as f:  # then renamed: reproduce.sh skips an evaluation whose file exists,
            json.dump(results, f, indent=1)  # so a kill must never leave a half-written one
        os.replace(path + ".tmp", path)
        print(f"results in {args.out_dir}/results.json ({results['seconds']} s)")


if __name__ == "__main__":
    common.main_guard(main)
