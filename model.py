"""Every nn.Module of MAE-CT: the ViT encoder, the MAE decoder, the NNCLR head and the nearest-neighbour queue.

Names follow facebookresearch/mae (models_mae.py) so that its checkpoints load key for key:
encoder `patch_embed.proj, cls_token, pos_embed, blocks.{i}.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2},
norm`, decoder `decoder_embed, mask_token, decoder_pos_embed, decoder_blocks, decoder_norm, decoder_pred`.

Shapes: B batch, C channels, H=W image side, p patch side, L = (H/p)^2 patches, D width, N queue length.
"""
import math

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

# Size presets (one dict, no factory functions). Paper sizes B/L/H as in MAE; tiny/small for 32 px images
# (ours); nano is a 0.2M-parameter encoder (0.3M with its decoder) for CPU tests and smoke runs. `pooling` is
# the paper's choice of feature for stages 2/3: mean of patch tokens for B and smaller, CLS for L and H (SPEC,
# stage 2).
PRESETS = {
    "vit_nano":  dict(embed_dim=64,   depth=4,  num_heads=4,  decoder_embed_dim=64,  decoder_depth=2, decoder_num_heads=4,  pooling="mean"),
    "vit_tiny":  dict(embed_dim=192,  depth=12, num_heads=3,  decoder_embed_dim=256, decoder_depth=4, decoder_num_heads=8,  pooling="mean"),
    "vit_small": dict(embed_dim=384,  depth=12, num_heads=6,  decoder_embed_dim=256, decoder_depth=4, decoder_num_heads=8,  pooling="mean"),
    "vit_base":  dict(embed_dim=768,  depth=12, num_heads=12, decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16, pooling="mean"),
    "vit_large": dict(embed_dim=1024, depth=24, num_heads=16, decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16, pooling="cls"),
    "vit_huge":  dict(embed_dim=1280, depth=32, num_heads=16, decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16, pooling="cls"),
}


def model_config(preset, img_size, patch_size, in_chans):
    """The plain dict that is saved in every checkpoint and rebuilds the model."""
    if preset not in PRESETS:
        raise ValueError(f"unknown model {preset!r}; choose from {', '.join(PRESETS)}")
    if img_size % patch_size:
        raise ValueError(f"image size {img_size} is not divisible by patch size {patch_size}")
    return dict(PRESETS[preset], model=preset, img_size=img_size, patch_size=patch_size, in_chans=in_chans)


def sincos_pos_embed(dim, grid_size, cls_token=True):
    """Fixed 2-D sin-cos position embedding (MAE, from MoCo v3): half the channels encode the row, half the
    column, each as [sin(pos*w), cos(pos*w)] with w = 1/10000^(k/(dim/4)). Returns (1 [+1], grid^2, dim);
    the CLS row is zeros (it gets no position)."""
    assert dim % 4 == 0, "sin-cos position embedding needs a width divisible by 4"
    omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4.0))  # (D/4,)
    rows, cols = np.meshgrid(np.arange(grid_size), np.arange(grid_size), indexing="ij")

    def encode(pos):  # (L,) -> (L, D/2)
        out = np.einsum("l,d->ld", pos.reshape(-1).astype(np.float64), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    # MAE's order: the first half of the channels encodes the column index (w), the second the row (h).
    emb = np.concatenate([encode(cols), encode(rows)], axis=1)  # (L, D)
    if cls_token:
        emb = np.concatenate([np.zeros([1, dim]), emb], axis=0)  # (1+L, D)
    return torch.from_numpy(emb).float().unsqueeze(0)


# ---------------------------------------------------------------- transformer block
class Attention(nn.Module):
    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, T, D = x.shape
        qkv = self.qkv(x).reshape(B, T, 3, self.num_heads, D // self.num_heads)  # (B, T, 3, h, D/h)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, h, T, D/h)
        x = F.scaled_dot_product_attention(q, k, v)  # flash attention on GPU, softmax(qk^T/sqrt(d)) v
        return self.proj(x.transpose(1, 2).reshape(B, T, D))  # (B, T, D)


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block (LN eps 1e-6, qkv bias, MLP ratio 4, GELU), as timm / MAE."""

    def __init__(self, dim, num_heads, mlp_ratio=4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    """Image to patch tokens with one strided conv: (B, C, H, W) -> (B, L, D)."""

    def __init__(self, patch_size, in_chans, dim):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, D, H/p, W/p) -> (B, L, D)


# ---------------------------------------------------------------- encoder
class VisionTransformer(nn.Module):
    """The ViT encoder of MAE. Its state dict is that of timm's VisionTransformer and of the official
    `mae_pretrain_vit_*.pth` files (position embedding as a buffer: it is fixed, never trained)."""

    def __init__(self, img_size=32, patch_size=4, in_chans=3, embed_dim=192, depth=12, num_heads=3,
                 model=None, pooling="mean", decoder_embed_dim=None, decoder_depth=None, decoder_num_heads=None):
        # model, pooling and the decoder's size complete a saved config (model_config) and are not used here, so
        # one config rebuilds the encoder or the whole MAE; any other key is an error
        super().__init__()
        self.patch_size, self.in_chans = patch_size, in_chans
        self.grid = img_size // patch_size
        self.num_patches = self.grid ** 2
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.register_buffer("pos_embed", sincos_pos_embed(embed_dim, self.grid), persistent=True)
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads) for _ in range(depth))
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.frozen_blocks, self.frozen_modules = 0, []  # see freeze()

    def random_masking(self, x, mask_ratio, noise=None):
        """Keep a random subset of L*(1-mask_ratio) tokens per sample, chosen by argsort of uniform noise
        (MAE). Returns kept tokens (B, K, D), the binary mask (B, L) with 1 = removed, and ids_restore (B, L)
        which puts a (kept + mask tokens) sequence back into patch order. `noise` (B, L) may be drawn by the
        caller (pretrain_mae.py does, eagerly): then the masks are the same in every compile mode, since inductor's
        random stream is not eager PyTorch's."""
        B, L, D = x.shape
        len_keep = int(L * (1 - mask_ratio))
        if noise is None:
            noise = torch.rand(B, L, device=x.device)
        ids_shuffle = torch.argsort(noise, dim=1)  # ascending: the smallest noise values are kept
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        ids_keep = ids_shuffle[:, :len_keep]  # (B, K)
        x_kept = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, D))  # (B, K, D)
        mask = torch.ones(B, L, device=x.device)
        mask[:, :len_keep] = 0
        mask = torch.gather(mask, 1, ids_restore)  # back to patch order
        return x_kept, mask, ids_restore

    def freeze(self, n_blocks):
        """Freeze the patch embedding, CLS token and the first n_blocks blocks (stage 3: the lower half; stage 2:
        all of them and the final norm). Frozen parts get no gradient, run without one (so they cost no activation
        memory) and stay in eval mode, as the authors' block freezer does. The count is an attribute, not a forward
        argument: torch.compile treats it as a constant."""
        self.frozen_blocks = n_blocks
        frozen = [self.patch_embed, *self.blocks[:n_blocks]]
        if n_blocks == len(self.blocks):  # stage 2: the whole encoder, final norm included
            frozen.append(self.norm)
        for m in frozen:
            m.requires_grad_(False)
        self.cls_token.requires_grad_(False)
        self.frozen_modules = frozen  # a plain list: no new state-dict entries
        return self.train(self.training)

    def train(self, mode=True):
        """nn.Module.train, except that frozen parts (freeze) stay in eval mode."""
        super().train(mode)
        for m in self.frozen_modules:
            m.eval()
        return self

    def forward_features(self, x, mask_ratio=0.0, noise=None):
        """(B, C, H, W) -> tokens after the final LayerNorm, (B, 1+K, D), CLS first. With mask_ratio > 0 only
        K = L(1-mask_ratio) patch tokens remain (chosen by `noise`, see random_masking) and (mask, ids_restore)
        are returned too."""
        n_frozen = self.frozen_blocks
        stem_trains = n_frozen == 0  # stage 1; in stages 2-3 the stem and the frozen blocks build no graph
        with torch.set_grad_enabled(torch.is_grad_enabled() and stem_trains):
            x = self.patch_embed(x) + self.pos_embed[:, 1:]  # (B, L, D)
            mask = ids_restore = None
            if mask_ratio > 0:
                x, mask, ids_restore = self.random_masking(x, mask_ratio, noise)  # (B, K, D)
            cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
            x = torch.cat([cls, x], dim=1)  # (B, 1+K, D)
            for blk in self.blocks[:n_frozen]:
                x = blk(x)
        for blk in self.blocks[n_frozen:]:
            x = blk(x)
        x = self.norm(x)
        return (x, mask, ids_restore) if mask_ratio > 0 else x

    def forward(self, x, pooling="mean"):
        """Pooled feature (B, D): CLS token or mean of the patch tokens, both after the final LayerNorm."""
        return pool(self.forward_features(x), pooling)


def pool(tokens, pooling):
    """(B, 1+L, D) tokens after the final LN -> (B, D): the CLS token or the mean of the patch tokens."""
    return tokens[:, 0] if pooling == "cls" else tokens[:, 1:].mean(dim=1)


# ---------------------------------------------------------------- MAE
class MaskedAutoencoder(VisionTransformer):
    """MAE (He et al. 2022): the encoder sees 25% of the patches, a light decoder predicts the pixels of the
    rest. Subclassing the encoder keeps the official flat key names (`blocks.0...`, `decoder_blocks.0...`)."""

    def __init__(self, decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16, norm_pix_loss=True, **cfg):
        super().__init__(**cfg)
        dim = cfg["embed_dim"]
        self.norm_pix_loss = norm_pix_loss
        self.decoder_embed = nn.Linear(dim, decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.register_buffer("decoder_pos_embed", sincos_pos_embed(decoder_embed_dim, self.grid))
        self.decoder_blocks = nn.ModuleList(Block(decoder_embed_dim, decoder_num_heads) for _ in range(decoder_depth))
        self.decoder_norm = nn.LayerNorm(decoder_embed_dim, eps=1e-6)
        self.decoder_pred = nn.Linear(decoder_embed_dim, self.patch_size ** 2 * self.in_chans)

    def patchify(self, imgs):
        """(B, C, H, W) -> (B, L, p*p*C), each patch flattened row by row, channels last (MAE order)."""
        p, g, C = self.patch_size, self.grid, self.in_chans
        x = imgs.reshape(imgs.shape[0], C, g, p, g, p)  # (B, C, h, p, w, p)
        x = torch.einsum("nchpwq->nhwpqc", x)
        return x.reshape(imgs.shape[0], g * g, p * p * C)

    def unpatchify(self, x):
        """(B, L, p*p*C) -> (B, C, H, W), the inverse of patchify."""
        p, g, C = self.patch_size, self.grid, self.in_chans
        x = x.reshape(x.shape[0], g, g, p, p, C)  # (B, h, w, p, p, C)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], C, g * p, g * p)

    def forward_decoder(self, x, ids_restore):
        """Encoded visible tokens (B, 1+K, D) -> per-patch pixel predictions (B, L, p*p*C)."""
        x = self.decoder_embed(x)  # (B, 1+K, Dd)
        B, L = ids_restore.shape
        mask_tokens = self.mask_token.expand(B, L + 1 - x.shape[1], -1)
        x_ = torch.cat([x[:, 1:], mask_tokens], dim=1)  # (B, L, Dd), kept tokens first
        x_ = torch.gather(x_, 1, ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[2]))  # patch order
        x = torch.cat([x[:, :1], x_], dim=1) + self.decoder_pos_embed  # (B, 1+L, Dd)
        for blk in self.decoder_blocks:
            x = blk(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:]  # drop CLS: (B, L, p*p*C)

    def forward_loss(self, imgs, pred, mask):
        """MSE on per-patch normalised pixels ((x-mean)/sqrt(var+1e-6)), averaged over masked patches only."""
        target = self.patchify(imgs)
        if self.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1e-6) ** 0.5
        loss = ((pred.float() - target.float()) ** 2).mean(dim=-1)  # (B, L), in fp32
        return (loss * mask).sum() / mask.sum()

    def forward(self, imgs, mask_ratio=0.75, noise=None):
        latent, mask, ids_restore = self.forward_features(imgs, mask_ratio=mask_ratio, noise=noise)
        pred = self.forward_decoder(latent, ids_restore)
        return self.forward_loss(imgs, pred, mask), pred, mask


# ---------------------------------------------------------------- NNCLR head and queue
class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks; the gradient of a sum is the sum of the gradients, so backward all-reduces too."""

    @staticmethod
    def forward(ctx, x):
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class SyncBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm1d whose training statistics cover the global batch of all ranks, so a DDP run normalises
    exactly as one process given the whole batch (the authors use SyncBatchNorm; torch's nn.SyncBatchNorm is
    GPU-only, this one also runs on CPU/gloo). Same state dict as BatchNorm1d; plain BN in one process."""

    def forward(self, x):
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        x32 = x.float()
        sums = _AllReduceSum.apply(torch.cat([x32.sum(0), x32.new_full((1,), x.shape[0])]))  # over the global batch
        n = sums[-1]
        mean = sums[:-1] / n
        # Two passes, not E[x^2] - E[x]^2, which cancels (even below 0) when a feature's mean dwarfs its spread.
        var = _AllReduceSum.apply(((x32 - mean) ** 2).sum(0)) / n  # biased variance, as BN
        with torch.no_grad():
            self.running_mean.lerp_(mean, self.momentum)
            self.running_var.lerp_(var * n / (n - 1), self.momentum)  # running estimate is unbiased, as BN
            self.num_batches_tracked += 1
        y = (x32 - mean) * torch.rsqrt(var + self.eps) * self.weight + self.bias
        return y.to(x.dtype)


def mlp(dims, last_bn=True):
    """Linear(no bias)-BN-ReLU blocks; the last Linear gets a BN only if last_bn (NNCLR projector)."""
    layers = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        layers.append(nn.Linear(a, b, bias=False))  # as NNCLR (where a BN follows, it would remove a bias anyway)
        last = i == len(dims) - 2
        if not last:
            layers += [SyncBatchNorm1d(b), nn.ReLU(inplace=True)]
        elif last_bn:
            layers.append(SyncBatchNorm1d(b))
    return nn.Sequential(*layers)


class NNCLRHead(nn.Module):
    """NNCLR projector D->2048->2048->256 (BN after each Linear, also the last) and predictor 256->4096->256
    (Dwibedi et al. 2021; MAE-CT's settings). Call it on one view at a time: BN statistics are per view. Its
    weights keep PyTorch's default init, as the authors' head (init_weights, the MAE's init, is for the ViT)."""

    def __init__(self, in_dim, proj_hidden=2048, proj_dim=256, pred_hidden=4096):
        super().__init__()
        self.projector = mlp([in_dim, proj_hidden, proj_hidden, proj_dim], last_bn=True)
        self.predictor = mlp([proj_dim, pred_hidden, proj_dim], last_bn=False)

    def forward(self, feat):
        proj = self.projector(feat)
        return proj, self.predictor(proj)


class NNQueue(nn.Module):
    """FIFO queue of N L2-normalised projections with the dataset index of each entry. Buffers, so the queue
    is saved with the checkpoint. Empty slots start as random unit vectors with index -1 (as NNCLR)."""

    def __init__(self, size, dim):
        super().__init__()
        self.register_buffer("embeddings", F.normalize(torch.randn(size, dim), dim=1))  # (N, d)
        self.register_buffer("indices", torch.full((size,), -1, dtype=torch.long))  # (N,)
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def lookup(self, z, idx, topk=1):
        """For normalised queries z (B, d) with dataset indices idx (B,): the nearest queue entry by cosine
        similarity (topk=1), or one drawn uniformly from the topk nearest. Entries of the same sample are
        excluded, also when topk reaches them. Returns (neighbours (B, d), their queue slots (B,))."""
        with torch.autocast(z.device.type, enabled=False):  # similarities in fp32, also under bf16 autocast
            sim = z.float() @ self.embeddings.float().T  # (B, N)
        sim.masked_fill_(idx[:, None] == self.indices[None, :], float("-inf"))
        if topk == 1:
            slot = sim.argmax(dim=1)
        else:
            top_sim, top = sim.topk(topk, dim=1)  # (B, k)
            # a uniform draw among the k: the largest of k random keys, where an excluded entry's key can never win
            keys = torch.rand(top.shape, device=z.device).masked_fill_(top_sim == float("-inf"), -1)
            slot = top.gather(1, keys.argmax(dim=1, keepdim=True)).squeeze(1)
        return self.embeddings[slot], slot

    @torch.no_grad()
    def enqueue(self, z, idx):
        """Write (n, d) normalised embeddings (already gathered over ranks) at the pointer, FIFO, wrapping
        around at the end (the scripts keep the queue a multiple of the global batch)."""
        n, size = z.shape[0], self.embeddings.shape[0]
        slots = (self.ptr + torch.arange(n, device=z.device)) % size  # on the device: no host sync per step
        self.embeddings.index_copy_(0, slots, z.to(self.embeddings.dtype))
        self.indices.index_copy_(0, slots, idx)
        self.ptr.add_(n).remainder_(size)


def nnclr_loss(nn_a, pred_b, temperature, rank=0):
    """Cross-entropy of queue neighbours of view a (n, d) against predictions of view b gathered over all
    ranks (world*n, d): the positive of query i is row rank*n + i. Both inputs L2-normalised; fp32."""
    with torch.autocast(nn_a.device.type, enabled=False):  # logits and softmax in fp32
        logits = nn_a.float() @ pred_b.float().T / temperature  # (n, world*n)
    labels = torch.arange(nn_a.shape[0], device=nn_a.device) + rank * nn_a.shape[0]
    return F.cross_entropy(logits, labels)


def symmetric_nnclr_loss(queue, z, pred, idx, temperature, topk, gather, rank):
    """The NNCLR objective of two views: the neighbour in the queue of view 0's embedding z[0] (n, d) is the
    positive of view 1's prediction, and the other way round; the two losses averaged. pred: the two (n, d)
    predictions (normalised here and gathered over ranks, with gradient). Returns (loss, the queue slots of view
    0's neighbours)."""
    with torch.no_grad():
        nn0, slots = queue.lookup(z[0], idx, topk)
        nn1, _ = queue.lookup(z[1], idx, topk)
    p = [gather(F.normalize(q.float(), dim=1)) for q in pred]  # (world*n, d), with gradient
    loss_01 = nnclr_loss(nn0, p[1], temperature, rank)  # view 0's neighbour is the positive of view 1's prediction
    loss_10 = nnclr_loss(nn1, p[0], temperature, rank)
    return (loss_01 + loss_10) / 2, slots


class MAECT(nn.Module):
    """Encoder + NNCLR head + queue: the model of stages 2 (head on a frozen encoder, encoder.freeze(depth))
    and 3 (upper blocks trained too, encoder.freeze(depth // 2)). With `target=True` (stage 3) an EMA copy of the projector supplies the
    lookup and the queue; without it the online projection (detached) does."""

    def __init__(self, cfg, queue_size, pooling, proj_hidden=2048, proj_dim=256, pred_hidden=4096, target=False):
        super().__init__()
        self.pooling = pooling
        self.encoder = VisionTransformer(**cfg)
        self.head = NNCLRHead(cfg["embed_dim"], proj_hidden, proj_dim, pred_hidden)
        self.queue = NNQueue(queue_size, proj_dim)
        self.target_projector = None
        if target:
            self.target_projector = mlp([cfg["embed_dim"], proj_hidden, proj_hidden, proj_dim], last_bn=True)
            self.target_projector.requires_grad_(False)

    def forward(self, views, idx, temperature, topk=1, gather=lambda x: x, rank=0):
        """views: two (n, C, H, W) batches of the same images, idx (n,) their dataset indices.
        Returns the symmetric loss, the normalised view-0 embedding to enqueue (n, d) and the dataset indices of
        view 0's neighbours (n,; -1 for an empty slot), for the NN-accuracy diagnostic: read here, since the enqueue
        overwrites the slots. `gather` concatenates over ranks, with gradient (common.gather); the caller enqueues
        after the optimiser step (SPEC, stage 2)."""
        # ViT has no batch statistics, so both views go through the encoder at once: (2n, D)
        feats = self.encoder(torch.cat(views), self.pooling).chunk(2)
        proj, pred = zip(*(self.head(f) for f in feats))  # the head sees one view at a time: BN per view
        with torch.no_grad():  # the embeddings that look up neighbours and fill the queue
            if self.target_projector is not None:
                z = [F.normalize(self.target_projector(f).float(), dim=1) for f in feats]
            else:
                z = [F.normalize(p.detach().float(), dim=1) for p in proj]
        loss, slots = symmetric_nnclr_loss(self.queue, z, pred, idx, temperature, topk, gather, rank)
        return loss, z[0], self.queue.indices[slots]


class JointMAE(nn.Module):
    """MAE and NNCLR trained together from the start with one loss, MAE + weight * NNCLR: the ablation that
    MAE-CT argues against (the sequential recipe MAE -> head -> tuning is better; the joint NNCLR loss falls fast
    by a shortcut on colour statistics). Built by pretrain_mae.py --nnclr_weight > 0; stage 1 alone never uses it.

    The NNCLR part pools the encoder tokens of the *masked* views, the very tokens the MAE loss already computes:
    one encoder pass per view, as a joint model naturally would be built (a second, unmasked pass would cost ~4x
    the encoder compute of the MAE pass and so would not be the same budget); the masking then also acts as an
    augmentation. Lookup: exact nearest neighbour (top-1) of the online projection, as stage 2."""

    def __init__(self, mae, queue_size, pooling, proj_hidden=2048, proj_dim=256, pred_hidden=4096):
        super().__init__()
        self.mae, self.pooling = mae, pooling
        self.head = NNCLRHead(mae.cls_token.shape[-1], proj_hidden, proj_dim, pred_hidden)
        self.queue = NNQueue(queue_size, proj_dim)

    def forward(self, views, idx, mask_ratio, temperature, gather=lambda x: x, rank=0, noise=None):
        """views: two (n, C, H, W) batches of the same images, idx (n,) their dataset indices, noise (2n, L) the
        masking draws (see random_masking). Returns
        (MAE loss over both views, symmetric NNCLR loss, normalised view-0 projection to enqueue (n, d), dataset
        indices of view 0's neighbours (n,), as MAECT); the caller enqueues after the optimiser step."""
        imgs = torch.cat(views)  # (2n, C, H, W): the same masking draws as a plain MAE with two views
        latent, mask, ids_restore = self.mae.forward_features(imgs, mask_ratio=mask_ratio, noise=noise)  # (2n, 1+K, D)
        mae_loss = self.mae.forward_loss(imgs, self.mae.forward_decoder(latent, ids_restore), mask)
        pooled = pool(latent, self.pooling)  # (2n, D), of the visible tokens
        proj, pred = zip(*(self.head(f) for f in pooled.chunk(2)))  # BN per view
        z = [F.normalize(p.detach().float(), dim=1) for p in proj]
        nnclr, slots = symmetric_nnclr_loss(self.queue, z, pred, idx, temperature, 1, gather, rank)  # top-1
        return mae_loss, nnclr, z[0], self.queue.indices[slots]


# ---------------------------------------------------------------- init and loading
def init_weights(model):
    """The official MAE init: xavier-uniform for every Linear (and for the patch-embedding conv viewed as a
    Linear, so its fan-in is p*p*C), zero biases, LayerNorm at (1, 0), normal(0.02) for the CLS and
    mask tokens. Position embeddings are fixed buffers and are left alone."""
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    for m in model.modules():
        if isinstance(m, PatchEmbed):
            w = m.proj.weight
            nn.init.xavier_uniform_(w.view(w.shape[0], -1))  # as a Linear (D, C*p*p)
            nn.init.zeros_(m.proj.bias)
    for name, p in model.named_parameters():
        if name.endswith("cls_token") or name.endswith("mask_token"):
            nn.init.normal_(p, std=0.02)
    return model


def infer_encoder_config(sd):
    """Model config from an encoder state dict alone (official MAE / timm files carry no config): width from
    cls_token, depth from the block count, patch size and channels from the patch conv, image size from the
    number of position rows; heads from the preset of that width and depth."""
    D = sd["cls_token"].shape[-1]
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    out_c, in_c, p, _ = sd["patch_embed.proj.weight"].shape
    L = sd["pos_embed"].shape[1] if "pos_embed" in sd else None
    if L is None:
        raise KeyError("pos_embed")
    L = L - 1 if math.isqrt(L - 1) ** 2 == L - 1 else L  # with or without the CLS row
    preset = next((n for n, c in PRESETS.items() if c["embed_dim"] == D and c["depth"] == depth), None)
    if preset is None:
        raise ValueError(f"no preset has width {D} and depth {depth}")
    return model_config(preset, math.isqrt(L) * p, p, in_c)


def encoder_state_dict(sd):
    """Encoder weights from any state dict we know: a stage-1 MAE (drops the decoder), a stage-2/3 MAECT
    (strips 'encoder.'), an official MAE pre-training file, or a timm ViT without classifier and pooling norm
    (num_classes=0, class-token pooling: a fine-tuned file's head and fc_norm do not load). A position embedding
    without the CLS row (timm's no_embed_class) gets a zero row in front."""
    if any(k.startswith("encoder.") for k in sd):
        sd = {k[len("encoder."):]: v for k, v in sd.items() if k.startswith("encoder.")}
    sd = {k: v for k, v in sd.items() if not (k.startswith("decoder") or k == "mask_token")}
    pe = sd.get("pos_embed")
    if pe is not None and math.isqrt(pe.shape[1]) ** 2 == pe.shape[1]:
        sd["pos_embed"] = torch.cat([pe.new_zeros(1, 1, pe.shape[2]), pe], dim=1)
    return sd
