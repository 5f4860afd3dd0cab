"""Tests for the ViT / MAE parts of model.py: patch order, masking, the MAE loss, position embeddings,
attention, official-checkpoint and timm compatibility, init, presets. CPU, a few seconds."""

import math
from functools import partial

import pytest
import torch
import torch.nn as nn

import common
from model import (PRESETS, Attention, MaskedAutoencoder, VisionTransformer, encoder_state_dict,
                   infer_encoder_config, init_weights, model_config, sincos_pos_embed)


def nano(img_size=32, patch_size=4, in_chans=3, **kw):
    torch.manual_seed(0)
    return MaskedAutoencoder(**model_config("vit_nano", img_size, patch_size, in_chans), **kw)


# ---------------------------------------------------------------- patchify
@pytest.mark.parametrize("img_size,patch_size,in_chans", [(32, 4, 3), (64, 16, 3), (28, 4, 1)])
def test_patchify_unpatchify_round_trip(img_size, patch_size, in_chans):
    model = nano(img_size, patch_size, in_chans)
    imgs = torch.randn(3, in_chans, img_size, img_size)
    x = model.patchify(imgs)
    L = (img_size // patch_size) ** 2
    assert x.shape == (3, L, patch_size ** 2 * in_chans)
    assert torch.equal(model.unpatchify(x), imgs)


@pytest.mark.parametrize("img_size,patch_size,in_chans", [(32, 4, 3), (64, 16, 3), (28, 4, 1)])
def test_patchify_order_is_row_major_channels_last(img_size, patch_size, in_chans):
    model = nano(img_size, patch_size, in_chans)
    p, g = patch_size, img_size // patch_size
    imgs = torch.randn(2, in_chans, img_size, img_size)
    x = model.patchify(imgs)
    for b, i, j in [(0, 0, 0), (1, 0, g - 1), (0, g - 1, 0), (1, 1, 2), (0, g - 1, g - 1)]:
        patch = imgs[b, :, i * p:(i + 1) * p, j * p:(j + 1) * p]  # (C, p, p): row i, column j of the grid
        expected = patch.permute(1, 2, 0).reshape(-1)  # pixels row by row, channels innermost
        assert torch.equal(x[b, i * g + j], expected), (b, i, j)


# ---------------------------------------------------------------- masking
@pytest.mark.parametrize("mask_ratio", [0.75, 0.5, 0.6, 0.9])
def test_random_masking_keeps_exactly_k_and_ids_restore_inverts(mask_ratio):
    model = nano()
    B, L, D = 4, model.num_patches, 8
    # token l of sample b carries its own position l (and b) so every token is identifiable
    x = torch.arange(L, dtype=torch.float32).view(1, L, 1).expand(B, L, D) + 1000 * torch.arange(B).view(B, 1, 1)
    torch.manual_seed(1)
    kept, mask, ids_restore = model.random_masking(x, mask_ratio)
    K = int(L * (1 - mask_ratio))
    assert kept.shape == (B, K, D) and mask.shape == (B, L) and ids_restore.shape == (B, L)
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    assert (mask.sum(dim=1) == L - K).all()
    for b in range(B):
        assert torch.equal(ids_restore[b].sort().values, torch.arange(L))  # a permutation
        # the kept tokens are exactly those where mask == 0 (each once)
        kept_pos = (kept[b, :, 0] - 1000 * b).long().sort().values
        assert torch.equal(kept_pos, (mask[b] == 0).nonzero().squeeze(1))
    # un-shuffle as the decoder does: kept tokens then dummies, gathered with ids_restore
    dummy = torch.full((B, L - K, D), -1.0)
    full = torch.gather(torch.cat([kept, dummy], dim=1), 1, ids_restore.unsqueeze(-1).expand(-1, -1, D))
    visible = (mask == 0).unsqueeze(-1).expand(-1, -1, D)
    assert torch.equal(full[visible], x[visible])
    assert (full[~visible] == -1).all()
    # different samples get different masks
    assert not all(torch.equal(mask[0], mask[b]) for b in range(1, B))


def test_masking_noise_given_by_the_caller():
    """pretrain_mae.py draws the noise eagerly (same masks in every compile mode): the same draw must give the same
    mask as the model's own, and the kept patches are those with the smallest noise."""
    model = nano().eval()
    imgs = torch.randn(3, 3, 32, 32)
    torch.manual_seed(4)
    latent, mask, ids_restore = model.forward_features(imgs, mask_ratio=0.75)
    torch.manual_seed(4)
    noise = torch.rand(3, model.num_patches)
    latent2, mask2, ids_restore2 = model.forward_features(imgs, mask_ratio=0.75, noise=noise)
    assert torch.equal(mask, mask2) and torch.equal(ids_restore, ids_restore2) and torch.equal(latent, latent2)
    smallest = torch.zeros_like(mask2).scatter_(1, noise.argsort(dim=1)[:, :16], 1.0)  # 16 = 25% of 64 kept
    assert torch.equal(mask2, 1 - smallest)
    assert torch.equal(model(imgs, 0.75, noise=noise)[2], mask2)


def test_encoder_with_masking_sees_only_kept_tokens():
    model = nano().eval()
    imgs = torch.randn(2, 3, 32, 32)
    torch.manual_seed(3)
    latent, mask, ids_restore = model.forward_features(imgs, mask_ratio=0.75)
    assert latent.shape == (2, 1 + 16, 64)
    # the same visible patches alone, in the same order, give the same encoding: masked pixels do not leak
    imgs2 = imgs.clone()
    m = model.unpatchify(mask.unsqueeze(-1).expand(-1, -1, 48)).bool()
    imgs2[m] = 1e3
    torch.manual_seed(3)
    latent2, mask2, _ = model.forward_features(imgs2, mask_ratio=0.75)
    assert torch.equal(mask, mask2)
    torch.testing.assert_close(latent, latent2)


# ---------------------------------------------------------------- loss
@pytest.mark.parametrize("norm_pix_loss", [True, False])
def test_loss_counts_only_masked_patches(norm_pix_loss):
    model = nano(norm_pix_loss=norm_pix_loss)
    imgs = torch.randn(2, 3, 32, 32)
    L, P = model.num_patches, 48
    torch.manual_seed(2)
    _, mask, _ = model.random_masking(torch.zeros(2, L, 1), 0.75)
    pred = torch.randn(2, L, P)
    loss = model.forward_loss(imgs, pred, mask)
    visible = (mask[0] == 0).nonzero()[0, 0]
    masked = (mask[0] == 1).nonzero()[0, 0]
    p2 = pred.clone()
    p2[0, visible] += 5.0
    assert torch.equal(model.forward_loss(imgs, p2, mask), loss)
    p3 = pred.clone()
    p3[0, masked] += 5.0
    assert model.forward_loss(imgs, p3, mask) > loss + 1e-3


@pytest.mark.parametrize("norm_pix_loss", [True, False])
def test_loss_equals_closed_form(norm_pix_loss):
    model = nano(norm_pix_loss=norm_pix_loss)
    imgs = torch.rand(2, 3, 32, 32, dtype=torch.float64)
    pred = torch.randn(2, 64, 48, dtype=torch.float64)
    torch.manual_seed(4)
    _, mask, _ = model.random_masking(torch.zeros(2, 64, 1), 0.75)
    total, count = 0.0, 0
    for b in range(2):
        for i in range(8):
            for j in range(8):
                if mask[b, i * 8 + j] == 0:
                    continue
                t = imgs[b, :, i * 4:(i + 1) * 4, j * 4:(j + 1) * 4].permute(1, 2, 0).reshape(-1).tolist()
                if norm_pix_loss:  # MAE: target.var(dim=-1), the unbiased variance
                    mu = sum(t) / len(t)
                    var = sum((v - mu) ** 2 for v in t) / (len(t) - 1)
                    t = [(v - mu) / math.sqrt(var + 1e-6) for v in t]
                p = pred[b, i * 8 + j].tolist()
                total += sum((a - c) ** 2 for a, c in zip(p, t)) / len(t)
                count += 1
    assert count == 2 * 48
    assert model.forward_loss(imgs, pred, mask).item() == pytest.approx(total / count, rel=1e-6)


def test_mae_forward_shapes_and_backward():
    model = init_weights(nano())
    torch.manual_seed(0)
    loss, pred, mask = model(torch.randn(4, 3, 32, 32), mask_ratio=0.75)
    assert pred.shape == (4, 64, 48) and mask.shape == (4, 64) and loss.ndim == 0
    loss.backward()
    # every parameter is used (mask_token and decoder included)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    # every LayerNorm, the decoder's too, has MAE's eps 1e-6 (the timm comparison below sees the encoder only)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert len(norms) == 2 * (4 + 2) + 2 and all(m.eps == 1e-6 for m in norms)


def test_decoder_puts_each_token_at_its_patch_and_adds_the_position_embedding():
    """forward_decoder against a loop: each encoded token goes to the patch it came from (the k-th kept token to
    patch ids_shuffle[k]), a mask token everywhere else, then the decoder's position embedding, blocks, norm, head.
    The decoder is narrower than the encoder (as in every real preset), so the two position embeddings differ."""
    torch.manual_seed(0)
    model = init_weights(MaskedAutoencoder(**{**model_config("vit_nano", 32, 4, 3), "decoder_embed_dim": 32,
                                              "decoder_num_heads": 2})).eval()
    assert model.decoder_pos_embed.shape == (1, 65, 32)
    torch.nn.init.normal_(model.mask_token, std=1.0)  # distinct from zero, so a misplaced mask token shows
    torch.manual_seed(1)
    latent, mask, ids_restore = model.forward_features(torch.randn(3, 3, 32, 32), mask_ratio=0.75)  # (3, 1+16, D)
    with torch.no_grad():
        x = model.decoder_embed(latent)  # (B, 1+K, Dd)
        B, K, L = x.shape[0], x.shape[1] - 1, ids_restore.shape[1]
        ids_shuffle = ids_restore.argsort(dim=1)  # position in patch order of the k-th token of the shuffled sequence
        assert (mask.gather(1, ids_shuffle[:, :K]) == 0).all() and mask.sum() == B * (L - K)  # kept = the first K
        seq = model.mask_token.expand(B, L, -1).clone()
        for b in range(B):
            for k in range(K):
                seq[b, ids_shuffle[b, k]] = x[b, 1 + k]
        seq = torch.cat([x[:, :1], seq], dim=1) + model.decoder_pos_embed  # (B, 1+L, Dd)
        for blk in model.decoder_blocks:
            seq = blk(seq)
        expected = model.decoder_pred(model.decoder_norm(seq))[:, 1:]  # (B, L, p*p*C)
        assert torch.allclose(model.forward_decoder(latent, ids_restore), expected, atol=1e-5)


def test_stage1_weight_decay_spares_tokens_biases_and_norms():
    """MAE's recipe: weight decay on the weight matrices only; biases, norms and the 3-D cls/mask tokens none."""
    mae = nano()
    groups = common.decay_groups(mae.named_parameters(), 0.05)
    names = {id(p): n for n, p in mae.named_parameters()}
    decay, spared = ({names[id(p)] for p in g["params"]} for g in groups)
    assert [g["weight_decay"] for g in groups] == [0.05, 0.0] and decay | spared == set(names.values())
    assert {"cls_token", "mask_token"} <= spared and not any(n.endswith("bias") or "norm" in n for n in decay)
    assert all(n.endswith("weight") and mae.get_parameter(n).ndim >= 2 for n in decay)


# ---------------------------------------------------------------- position embedding
@pytest.mark.parametrize("dim,grid", [(8, 3), (16, 4)])
def test_sincos_pos_embed_closed_form(dim, grid):
    emb = sincos_pos_embed(dim, grid)
    assert emb.shape == (1, 1 + grid * grid, dim)
    assert torch.equal(emb[0, 0], torch.zeros(dim))  # CLS gets no position
    q = dim // 4
    for i in range(grid):  # row
        for j in range(grid):  # column
            row = emb[0, 1 + i * grid + j]
            for c in range(dim):
                k = c % q
                w = 1.0 / 10000 ** (k / q)
                pos = j if c < dim // 2 else i  # MAE: first half the column (w), second half the row (h)
                f = math.sin if (c % (dim // 2)) < q else math.cos
                assert row[c].item() == pytest.approx(f(pos * w), abs=1e-6), (i, j, c)
    no_cls = sincos_pos_embed(dim, grid, cls_token=False)
    assert torch.equal(no_cls, emb[:, 1:])


def test_pos_embed_is_a_saved_buffer():
    model = nano()
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    sd = model.state_dict()
    for name, dim in [("pos_embed", 64), ("decoder_pos_embed", 64)]:
        assert name not in params and name in buffers and name in sd
        assert torch.equal(sd[name], sincos_pos_embed(dim, 8))


# ---------------------------------------------------------------- attention
def test_pooling_is_the_cls_token_or_the_mean_of_the_patch_tokens():
    """After the final LayerNorm, CLS token first: "cls" takes it, "mean" averages the others without it."""
    torch.manual_seed(0)
    enc = VisionTransformer(**model_config("vit_nano", 16, 4, 3)).eval()
    with torch.no_grad():
        enc.cls_token.normal_()  # (zero at init: a mean that took it in would still differ, but by less)
        x = torch.randn(2, 3, 16, 16)
        tokens = enc.forward_features(x)  # (2, 1 + 16, D)
        assert torch.allclose(enc(x, "cls"), tokens[:, 0]) and torch.allclose(enc(x, "mean"), tokens[:, 1:].mean(1))
        assert not torch.allclose(enc(x, "mean"), tokens.mean(1), atol=1e-4)


def test_attention_matches_naive_softmax():
    torch.manual_seed(0)
    B, T, D, h = 2, 5, 32, 4
    attn = Attention(D, h).double()
    x = torch.randn(B, T, D, dtype=torch.float64)
    Wqkv, bqkv = attn.qkv.weight, attn.qkv.bias  # (3D, D): rows [q | k | v], each split into heads
    d = D // h
    out = torch.zeros(B, T, D, dtype=torch.float64)
    for b in range(B):
        qkv = x[b] @ Wqkv.T + bqkv  # (T, 3D)
        for hh in range(h):
            q = qkv[:, hh * d:(hh + 1) * d]
            k = qkv[:, D + hh * d:D + (hh + 1) * d]
            v = qkv[:, 2 * D + hh * d:2 * D + (hh + 1) * d]
            a = torch.softmax(q @ k.T / math.sqrt(d), dim=-1)  # (T, T)
            out[b, :, hh * d:(hh + 1) * d] = a @ v
    expected = out @ attn.proj.weight.T + attn.proj.bias
    with torch.no_grad():
        torch.testing.assert_close(attn(x), expected, rtol=1e-10, atol=1e-10)


# ---------------------------------------------------------------- official checkpoints
def _block_keys(prefix, D, hidden):
    return {
        f"{prefix}.norm1.weight": (D,), f"{prefix}.norm1.bias": (D,),
        f"{prefix}.attn.qkv.weight": (3 * D, D), f"{prefix}.attn.qkv.bias": (3 * D,),
        f"{prefix}.attn.proj.weight": (D, D), f"{prefix}.attn.proj.bias": (D,),
        f"{prefix}.norm2.weight": (D,), f"{prefix}.norm2.bias": (D,),
        f"{prefix}.mlp.fc1.weight": (hidden, D), f"{prefix}.mlp.fc1.bias": (hidden,),
        f"{prefix}.mlp.fc2.weight": (D, hidden), f"{prefix}.mlp.fc2.bias": (D,),
    }


def official_shapes(D, depth, img, p, C=3, dec_D=None, dec_depth=0):
    """Key -> shape of facebookresearch/mae's mae_pretrain_vit_*.pth (encoder) or *_full.pth (with decoder),
    written out from the SPEC, independent of model.py."""
    L = (img // p) ** 2
    shapes = {"cls_token": (1, 1, D), "pos_embed": (1, 1 + L, D),
              "patch_embed.proj.weight": (D, C, p, p), "patch_embed.proj.bias": (D,)}
    for i in range(depth):
        shapes.update(_block_keys(f"blocks.{i}", D, 4 * D))
    shapes.update({"norm.weight": (D,), "norm.bias": (D,)})
    if dec_D:
        shapes.update({"decoder_embed.weight": (dec_D, D), "decoder_embed.bias": (dec_D,),
                       "mask_token": (1, 1, dec_D), "decoder_pos_embed": (1, 1 + L, dec_D)})
        for i in range(dec_depth):
            shapes.update(_block_keys(f"decoder_blocks.{i}", dec_D, 4 * dec_D))
        shapes.update({"decoder_norm.weight": (dec_D,), "decoder_norm.bias": (dec_D,),
                       "decoder_pred.weight": (p * p * C, dec_D), "decoder_pred.bias": (p * p * C,)})
    return shapes


def test_official_full_checkpoint_loads_strictly(tmp_path):
    torch.manual_seed(0)
    sd = {k: torch.randn(s) for k, s in official_shapes(64, 4, 32, 4, dec_D=64, dec_depth=2).items()}
    path = tmp_path / "mae_pretrain_vit_nano_full.pth"
    torch.save({"model": sd}, path)
    ckpt = common.load_checkpoint(str(path))
    assert ckpt["stage"] == "official"
    full = MaskedAutoencoder(**model_config("vit_nano", 32, 4, 3))
    full.load_state_dict(ckpt["model"], strict=True)
    common.load_strict(full, ckpt["model"], "official")
    assert set(full.state_dict()) == set(sd)
    assert all(torch.equal(full.state_dict()[k], v) for k, v in sd.items())
    # encoder only: the decoder and mask token are dropped, the config is read off the shapes
    cfg, enc_sd = common.encoder_from_checkpoint(ckpt, "official")
    assert cfg == model_config("vit_nano", 32, 4, 3)
    enc = VisionTransformer(**cfg)
    enc.load_state_dict(enc_sd, strict=True)
    enc_keys = official_shapes(64, 4, 32, 4)
    assert set(enc.state_dict()) == set(enc_keys)
    assert all(torch.equal(enc.state_dict()[k], sd[k]) for k in enc_keys)


def test_stage_checkpoints_give_encoder_state_dict():
    cfg = model_config("vit_nano", 32, 4, 3)
    mae = init_weights(nano())
    enc = VisionTransformer(**cfg)
    enc.load_state_dict(encoder_state_dict(mae.state_dict()), strict=True)  # stage-1 MAE: decoder dropped
    wrapped = {f"encoder.{k}": v for k, v in enc.state_dict().items()}
    wrapped["head.projector.0.weight"] = torch.zeros(3, 3)
    enc2 = VisionTransformer(**cfg)
    enc2.load_state_dict(encoder_state_dict(wrapped), strict=True)  # stage-2/3: 'encoder.' stripped
    assert all(torch.equal(a, b) for a, b in zip(enc.state_dict().values(), enc2.state_dict().values()))


def test_infer_encoder_config_vit_base():
    with torch.device("meta"):  # shapes only
        sd = {k: torch.empty(s) for k, s in official_shapes(768, 12, 224, 16).items()}
    assert infer_encoder_config(sd) == model_config("vit_base", 224, 16, 3)
    assert infer_encoder_config(sd)["num_heads"] == 12
    sd["pos_embed"] = torch.empty(1, 196, 768, device="meta")  # timm no_embed_class: no CLS row
    assert infer_encoder_config(sd) == model_config("vit_base", 224, 16, 3)
    with torch.device("meta"):
        sd = {k: torch.empty(s) for k, s in official_shapes(1280, 32, 224, 14).items()}
    assert infer_encoder_config(sd) == model_config("vit_huge", 224, 14, 3)
    with torch.device("meta"):
        sd = {k: torch.empty(s) for k, s in official_shapes(100, 3, 32, 4).items()}
    with pytest.raises(ValueError):
        infer_encoder_config(sd)


def test_num_heads_of_a_file_without_config():
    """The weights cannot tell the head count (qkv is (3D, D) for any), yet it changes what the encoder computes:
    an official/timm file takes the preset's unless told (--num_heads); our checkpoints keep the recorded one."""
    cfg = model_config("vit_nano", 32, 4, 3)
    enc = init_weights(VisionTransformer(**cfg))
    official = {"model": enc.state_dict()}
    assert common.encoder_from_checkpoint(official, "f")[0] == cfg
    cfg2, sd = common.encoder_from_checkpoint(official, "f", num_heads=2)
    assert cfg2 == dict(cfg, num_heads=2)
    enc2 = VisionTransformer(**cfg2)
    enc2.load_state_dict(sd, strict=True)  # loads silently: only the config can say
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert not torch.allclose(enc(x), enc2(x), atol=1e-4)
    with pytest.raises(common.UserError, match="does not divide"):
        common.encoder_from_checkpoint(official, "f", num_heads=3)
    ours = {"model": enc.state_dict(), "config": cfg}
    assert common.encoder_from_checkpoint(ours, "f", num_heads=4)[0] == cfg
    with pytest.raises(common.UserError, match="trained with 4 heads"):
        common.encoder_from_checkpoint(ours, "f", num_heads=2)


def authors_file(enc, heads):
    """An encoder saved as the MAE-CT authors release theirs (ml-jku/MAE-CT, `maect_base16.th`), written out from
    their checkpoint writer and ViT, independent of common.py: {"state_dict", "ctor_kwargs" (their YAML model
    config)}, timm's key names, and a position embedding without the CLS row (their eval_probe_timm.py pads one)."""
    sd = {k: v.clone() for k, v in enc.state_dict().items()}
    sd["pos_embed"] = sd["pos_embed"][:, 1:]
    kwargs = {"kind": "vit.masked_encoder", "patch_size": enc.patch_embed.proj.kernel_size[0],
              "embedding_dim": sd["cls_token"].shape[-1], "depth": len(enc.blocks), "attention_heads": heads,
              "is_frozen": False, "optim": {"kind": "adamw", "lr": 1e-4, "betas": [0.9, 0.95]}}
    return {"state_dict": sd, "ctor_kwargs": kwargs}


def test_the_authors_released_encoders_load_with_their_head_count(tmp_path):
    """ml-jku/MAE-CT's released encoders (MAE re-implementation, MAE-CT, MAE-CT_aug) load as official weights and
    compute what the saved encoder computes; their config names the head count, which is used (here 2 against
    the preset's 4) and checked against --num_heads."""
    cfg = dict(model_config("vit_nano", 32, 4, 3), num_heads=2)
    enc = init_weights(VisionTransformer(**cfg))
    with torch.no_grad():
        enc.cls_token.normal_()  # not the init's small values: a swapped CLS token/row would show
    torch.save(authors_file(enc, heads=2), tmp_path / "maect_nano4.th")
    ckpt = common.load_checkpoint(str(tmp_path / "maect_nano4.th"), stages=["mae", "official"])
    assert ckpt["stage"] == "official"
    cfg2, sd = common.encoder_from_checkpoint(ckpt, "maect_nano4.th")
    assert cfg2 == cfg
    enc2 = VisionTransformer(**cfg2)
    enc2.load_state_dict(sd, strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(enc(x), enc2(x))
    assert common.encoder_from_checkpoint(ckpt, "f", num_heads=2)[0] == cfg
    with pytest.raises(common.UserError, match="records 2 attention heads"):
        common.encoder_from_checkpoint(ckpt, "f", num_heads=4)
    # without a head count in its config (or with a non-integer one), the preset's, as for an official file
    bare_kwargs = authors_file(enc, heads=None)
    assert common.encoder_from_checkpoint(common.weights_file(bare_kwargs), "f")[0]["num_heads"] == 4
    bare_kwargs["ctor_kwargs"] = None
    assert common.encoder_from_checkpoint(common.weights_file(bare_kwargs), "f")[0]["num_heads"] == 4


def test_a_bare_state_dict_loads_as_official_weights_and_other_dicts_do_not(tmp_path):
    enc = init_weights(VisionTransformer(**model_config("vit_nano", 32, 4, 3)))
    torch.save(enc.state_dict(), tmp_path / "vit.pth")  # torch.save(model.state_dict()), as timm's files
    ckpt = common.load_checkpoint(str(tmp_path / "vit.pth"), stages=["official"])
    assert ckpt["stage"] == "official" and ckpt["model"].keys() == enc.state_dict().keys()
    assert common.encoder_from_checkpoint(ckpt, "f")[0] == model_config("vit_nano", 32, 4, 3)
    for other in ({"weight": torch.zeros(2)}, {"cls_token": torch.zeros(1, 1, 64), "note": "x"},
                  {"state_dict": [1, 2]}):
        torch.save(other, tmp_path / "other.pth")
        with pytest.raises(common.UserError, match="nor ViT weights in a layout we know"):
            common.load_checkpoint(str(tmp_path / "other.pth"))


def test_pos_embed_without_cls_row_gets_padded():
    torch.manual_seed(0)
    sd = {k: torch.randn(s) for k, s in official_shapes(64, 4, 32, 4).items()}
    pe = sd["pos_embed"][:, 1:].clone()
    sd["pos_embed"] = pe  # (1, L, D)
    out = encoder_state_dict(sd)
    assert out["pos_embed"].shape == (1, 65, 64)
    assert torch.equal(out["pos_embed"][:, 0], torch.zeros(1, 64))
    assert torch.equal(out["pos_embed"][:, 1:], pe)
    assert infer_encoder_config(out) == model_config("vit_nano", 32, 4, 3)
    VisionTransformer(**model_config("vit_nano", 32, 4, 3)).load_state_dict(out, strict=True)


# ---------------------------------------------------------------- timm
def _timm_vit():
    timm_vit = pytest.importorskip("timm.models.vision_transformer")
    return timm_vit.VisionTransformer(
        img_size=32, patch_size=4, in_chans=3, embed_dim=64, depth=4, num_heads=4, mlp_ratio=4.0, qkv_bias=True,
        norm_layer=partial(nn.LayerNorm, eps=1e-6), class_token=True, global_pool="", num_classes=0,
        dynamic_img_size=False)


def test_matches_timm_vision_transformer():
    ref = _timm_vit().eval()
    cfg = model_config("vit_nano", 32, 4, 3)
    torch.manual_seed(0)
    ours = init_weights(VisionTransformer(**cfg)).eval()
    with torch.no_grad():  # make every weight non-trivial (init leaves norms at 1/0 and biases at 0)
        for p in ours.parameters():
            p.add_(0.1 * torch.randn_like(p))
    ref.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours.forward_features(x), ref.forward_features(x), rtol=1e-5, atol=1e-5)
    # and the other way: a timm state dict (learned, random pos_embed) loads strictly into ours
    torch.manual_seed(1)
    ref2 = _timm_vit().eval()
    ours2 = VisionTransformer(**cfg).eval()
    ours2.load_state_dict(encoder_state_dict(ref2.state_dict()), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(ours2.forward_features(x), ref2.forward_features(x), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- init
def test_init_weights_follows_official_mae():
    torch.manual_seed(0)
    model = init_weights(nano())
    n_linear = 0
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            n_linear += 1
            fan_out, fan_in = m.weight.shape
            bound = math.sqrt(6 / (fan_in + fan_out))  # xavier-uniform
            w = m.weight.detach()
            assert w.abs().max() <= bound + 1e-7, name
            assert w.abs().max() > 0.9 * bound, name  # the whole range is used
            assert w.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.05), name
            assert torch.equal(m.bias, torch.zeros_like(m.bias)), name
        elif isinstance(m, nn.LayerNorm):
            assert torch.equal(m.weight, torch.ones_like(m.weight)) and torch.equal(m.bias, torch.zeros_like(m.bias))
    assert n_linear == 4 * 4 + 2 * 4 + 2  # 4 per block (qkv, proj, fc1, fc2) + decoder_embed + decoder_pred
    # the patch-embedding conv as a Linear of fan-in C*p*p (the default conv init would be bounded by 1/sqrt(48))
    w = model.patch_embed.proj.weight.detach()
    bound = math.sqrt(6 / (3 * 4 * 4 + 64))
    assert w.abs().max() <= bound + 1e-7 and w.abs().max() > 0.9 * bound
    assert w.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.05)
    assert torch.equal(model.patch_embed.proj.bias, torch.zeros(64))
    for tok in (model.cls_token, model.mask_token):
        assert 0.012 < tok.std().item() < 0.03 and tok.abs().max() < 0.02 * 5
    # fixed position embeddings are left alone
    assert torch.equal(model.pos_embed, sincos_pos_embed(64, 8))
    assert torch.equal(model.decoder_pos_embed, sincos_pos_embed(64, 8))


# ---------------------------------------------------------------- presets and config
@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_builds(name):
    img, p = (32, 4) if name in ("vit_nano", "vit_tiny", "vit_small") else (224, 16)
    cfg = model_config(name, img, p, 3)
    with torch.device("meta"):
        mae = MaskedAutoencoder(**cfg)
    assert len(mae.blocks) == PRESETS[name]["depth"] and len(mae.decoder_blocks) == PRESETS[name]["decoder_depth"]
    assert mae.cls_token.shape == (1, 1, PRESETS[name]["embed_dim"])
    assert PRESETS[name]["embed_dim"] % PRESETS[name]["num_heads"] == 0
    assert PRESETS[name]["pooling"] in ("mean", "cls")


def _n_params(module):
    return sum(p.numel() for p in module.parameters())


def test_preset_sizes():
    assert 100_000 < _n_params(nano()) < 600_000
    with torch.device("meta"):
        base = VisionTransformer(**model_config("vit_base", 224, 16, 3))
        large = VisionTransformer(**model_config("vit_large", 224, 16, 3))
        huge = VisionTransformer(**model_config("vit_huge", 224, 14, 3))
        tiny = VisionTransformer(**model_config("vit_tiny", 32, 4, 3))
    assert 85e6 < _n_params(base) < 87e6  # ViT-B/16: 86M
    assert 300e6 < _n_params(large) < 306e6  # ViT-L/16: 304M
    assert 625e6 < _n_params(huge) < 635e6  # ViT-H/14: 632M
    assert 5e6 < _n_params(tiny) < 6e6  # ViT-Ti: 5.7M


def test_model_config_rejects_bad_input():
    with pytest.raises(ValueError, match="divisible"):
        model_config("vit_nano", 30, 4, 3)
    with pytest.raises(ValueError, match="unknown model"):
        model_config("vit_gigantic", 32, 4, 3)
    cfg = model_config("vit_small", 32, 4, 3)
    assert cfg["img_size"] == 32 and cfg["patch_size"] == 4 and cfg["in_chans"] == 3 and cfg["model"] == "vit_small"
    assert cfg["embed_dim"] == 384 and cfg["depth"] == 12 and cfg["num_heads"] == 6
    # a saved config rebuilds the encoder or the whole MAE; a key that neither takes is an error, not ignored
    VisionTransformer(**cfg)
    with pytest.raises(TypeError, match="embed_dimm"):
        VisionTransformer(**cfg, embed_dimm=999)
    with pytest.raises(TypeError, match="embed_dimm"):
        MaskedAutoencoder(**cfg, embed_dimm=999)


def test_sync_batchnorm_over_ranks_equals_batchnorm_on_the_global_batch(monkeypatch):
    """SyncBatchNorm1d under a fake 2-rank group whose all_reduce doubles (the other rank holds the same batch):
    the global batch is the batch twice, so the output equals BatchNorm1d's and the running variance is unbiased
    over 2B. Features whose mean dwarfs their spread (300 +- 0.01) are where E[x^2] - E[x]^2 cancels to garbage."""
    import torch.distributed as dist
    from model import SyncBatchNorm1d
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(dist, "all_reduce", lambda t: t.mul_(2))
    torch.manual_seed(0)
    x = torch.cat([torch.randn(32, 3), 300 + 0.01 * torch.randn(32, 1)], dim=1)
    sync, ref = SyncBatchNorm1d(4), torch.nn.BatchNorm1d(4).double()
    y, y_ref = sync(x), ref(x.double())
    assert torch.allclose(y.double(), y_ref, atol=2e-3), (y - y_ref).abs().max()
    var64 = x.double().var(0, unbiased=False)
    assert torch.allclose(sync.running_var.double(), 0.9 + 0.1 * var64 * 64 / 63, rtol=1e-3)
