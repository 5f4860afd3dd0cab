"""Tests for data.py: crop boxes, batched views, sharding, and every dataset loader. CPU, a few seconds."""

import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import data  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
CIFAR5K = SHARED / "cifar10-5k"
needs_cifar5k = pytest.mark.skipif(not CIFAR5K.is_dir(), reason=f"shared test data absent: {CIFAR5K}")


# ---- crop boxes ----

def test_crop_boxes_follow_torchvision_get_params():
    torch.manual_seed(0)
    H, W, n = 180, 240, 20000
    top, left, h, w = data.random_resized_crop_boxes(n, H, W, (0.08, 1.0), (3 / 4, 4 / 3), "cpu").unbind(1)
    assert torch.equal(h, h.round()) and torch.equal(w, w.round()) and (h >= 1).all() and (w >= 1).all()
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= H).all() and (left + w <= W).all()
    # W/H = 4/3 is inside the ratio range, so a fallback box is the whole image.
    fallback = (h == H) & (w == W) & (top == 0) & (left == 0)
    h, w, top, left = h[~fallback], w[~fallback], top[~fallback], left[~fallback]
    area, ratio = h * w / (H * W), w / h
    slack = (h + w) / (H * W)  # w and h are rounded to integers: area may move by about (h + w) / 2 pixels
    assert (area >= 0.08 - slack).all() and (area <= 1.0 + slack).all()
    rel = 1 / torch.minimum(h, w)  # rounding changes w/h by at most ~1/min(h, w) relatively
    assert (ratio >= 3 / 4 * (1 - rel)).all() and (ratio <= 4 / 3 * (1 + rel)).all()
    # The whole ranges are used, not a corner of them, and positions are uniform.
    assert area.min() < 0.1 and area.max() > 0.95 and ratio.min() < 0.78 and ratio.max() > 1.28
    # Same distribution as torchvision's own sampler (rejections at large scales shift the mean below 0.54).
    from torchvision.transforms import RandomResizedCrop
    ref = torch.tensor([RandomResizedCrop.get_params(torch.empty(1, H, W), [0.08, 1.0], [3 / 4, 4 / 3])
                        for _ in range(5000)], dtype=torch.float32)  # (top, left, h, w)
    ref_area, ref_ratio = ref[:, 2] * ref[:, 3] / (H * W), ref[:, 3] / ref[:, 2]
    assert abs(area.mean() - ref_area.mean()) < 0.015 and abs(area.std() - ref_area.std()) < 0.015
    assert abs(ratio.mean() - ref_ratio.mean()) < 0.01
    free = (H - h) > 10
    assert abs((top[free] / (H - h[free])).mean().item() - 0.5) < 0.02


def test_crop_boxes_fallback_is_clamped_centre_crop():
    torch.manual_seed(0)
    # Square image, ratio 2..3 at scale >= 0.9 never fits: centre crop of the full width, height W/2.
    boxes = data.random_resized_crop_boxes(100, 64, 64, (0.9, 1.0), (2.0, 3.0), "cpu")
    assert (boxes == torch.tensor([16.0, 0.0, 32.0, 64.0])).all()
    # A wide 40x200 image at scale >= 0.9 never fits either: full height, width 40 * 4/3 = 53, centred.
    boxes = data.random_resized_crop_boxes(100, 40, 200, (0.9, 1.0), (3 / 4, 4 / 3), "cpu")
    assert (boxes == torch.tensor([0.0, 73.0, 40.0, 53.0])).all()


# ---- crop, resize and flip in one grid_sample ----

def test_crop_resize_flip_whole_image_is_identity_and_flip_mirrors():
    torch.manual_seed(0)
    x = torch.rand(3, 3, 32, 32)
    whole = torch.tensor([[0.0, 0.0, 32.0, 32.0]] * 3)
    out = data.crop_resize_flip(x, whole, torch.zeros(3, dtype=torch.bool), 32)
    torch.testing.assert_close(out, x, atol=1e-5, rtol=0)
    flipped = data.crop_resize_flip(x, whole, torch.tensor([True, False, True]), 32)
    torch.testing.assert_close(flipped[[0, 2]], x[[0, 2]].flip(-1), atol=1e-5, rtol=0)
    torch.testing.assert_close(flipped[1], x[1], atol=1e-5, rtol=0)


@pytest.mark.parametrize("box", [(0, 0, 16, 16), (16, 16, 16, 16), (8, 4, 16, 24)])
def test_crop_resize_flip_matches_torchvision_resized_crop(box):
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF
    torch.manual_seed(0)
    x = torch.rand(2, 3, 32, 32)
    top, left, h, w = box
    ref = TF.resized_crop(x, top, left, h, w, [32, 32], InterpolationMode.BICUBIC, antialias=False)
    out = data.crop_resize_flip(x, torch.tensor([box] * 2, dtype=torch.float32), torch.tensor([False, True]), 32)
    # Inside, the two are the same bicubic filter; at the border, torchvision clamps to the crop while we read
    # the real pixels next to it (a bicubic tap reaches 2 source pixels = 4 output pixels out).
    torch.testing.assert_close(out[0, :, 4:-4, 4:-4], ref[0, :, 4:-4, 4:-4], atol=1e-4, rtol=0)
    torch.testing.assert_close(out[1, :, 4:-4, 4:-4], ref[1].flip(-1)[:, 4:-4, 4:-4], atol=1e-4, rtol=0)
    assert (out[0] - ref[0]).abs().mean() < 0.05


def test_augment_flips_about_half():
    torch.manual_seed(0)
    ramp = torch.arange(32, dtype=torch.uint8).mul(8).expand(1000, 3, 32, 32)  # brighter to the right
    (v,) = data.augment(ramp, "minimal", 1, 32, data.IMAGENET_MEAN, data.IMAGENET_STD)
    flipped = v[..., :16].mean(dim=(1, 2, 3)) > v[..., 16:].mean(dim=(1, 2, 3))
    assert 0.4 < flipped.float().mean().item() < 0.6


def _image_folder(root, images, size=None):
    """Write uint8 (N, 3, H, W) images as PNGs of one class under root/train (root/val empty) and load the train
    split file-backed, as ImageNet-size folders are, at `size` (default: the images' width)."""
    (root / "train" / "a").mkdir(parents=True)
    (root / "val" / "a").mkdir(parents=True)
    for i, im in enumerate(images):
        Image.fromarray(im.permute(1, 2, 0).numpy()).save(root / "train" / "a" / f"{i:03d}.png")
    return data.load_split("imagefolder", str(root), "train", size or images.shape[-1], in_memory=False)


def test_file_backed_views_flip_about_half(tmp_path):
    """The file-backed training views mirror about half the crops (torchvision's RandomHorizontalFlip after the
    RandomResizedCrop), as augment() does in memory. At crop scale (1, 1) each view is the whole ramp image, so a
    view whose left half is brighter than its right half was mirrored."""
    torch.manual_seed(0)
    ramp = torch.arange(32, dtype=torch.uint8).mul(8).expand(16, 3, 32, 32)  # brighter to the right
    files = _image_folder(tmp_path, ramp)
    loader = data.ViewLoader(files, 16, "minimal", 8, 32, "cpu", shuffle=False, num_workers=0,
                             crop_scale=(1.0, 1.0))
    _, views, _ = next(iter(loader))
    v = torch.stack(views)  # (8 views, 16 images, 3, 32, 32)
    left, right = v[..., :16].mean(dim=(2, 3, 4)), v[..., 16:].mean(dim=(2, 3, 4))
    assert ((left - right).abs() > 0.5).all()  # whole ramps, clearly one way or the other
    assert 0.3 < (left > right).float().mean().item() < 0.7  # 128 views


def test_file_backed_crops_depend_on_seed_epoch_and_image_only(tmp_path):
    """File-backed crops are drawn from a seed of (seed, epoch, image): the same with or without loader workers,
    a resumed epoch continues with the crops it would have had, other epochs and seeds draw others, and the main
    process's generator is left as it was (its draws belong to the training step)."""
    files = _image_folder(tmp_path, torch.randint(0, 256, (12, 3, 16, 16), generator=torch.Generator().manual_seed(0),
                                                  dtype=torch.uint8))

    def epoch(workers, epoch=0, start_batch=0, seed=3):
        loader = data.ViewLoader(files, 4, "minimal", 2, 8, "cpu", seed=seed, num_workers=workers)
        loader.set_epoch(epoch, start_batch)
        torch.manual_seed(123)
        out = [(idx, torch.stack(views)) for idx, views, _ in loader]
        return torch.cat([i for i, _ in out]), torch.cat([v for _, v in out], dim=1), torch.get_rng_state()

    idx, views, rng = epoch(0)
    idx2, views2, rng2 = epoch(2)
    assert torch.equal(idx, idx2) and torch.equal(views, views2)
    assert torch.equal(rng, rng2)  # in-process loading (0 workers) did not reseed the main generator
    idx_r, views_r, _ = epoch(0, start_batch=1)  # resumed after the first batch
    assert torch.equal(idx_r, idx[4:]) and torch.equal(views_r, views[:, 4:])
    assert not torch.equal(views[0], views[1])  # two views, two crops

    def by_image(idx, views):
        return views[:, torch.argsort(idx)]

    # Other epochs and other seeds draw other crops of every image: not only the next epoch, but also epoch 2 and
    # seed 5 (a seed that kept only the low 32 bits of (seed * K + epoch) * 2**31 repeated every other epoch).
    for other in (epoch(0, epoch=1), epoch(0, epoch=2), epoch(0, seed=5), epoch(0, seed=4)):
        assert not torch.isclose(by_image(*other[:2]), by_image(idx, views)).all(dim=(2, 3, 4)).any()


def test_file_backed_crops_differ_between_images_of_one_epoch(tmp_path):
    """The crop seed depends on the image: eight copies of one picture get eight different crops in one epoch
    (a seed of (seed, epoch) alone would crop them all alike), and 1000 images get 1000 different seeds."""
    one = torch.randint(0, 256, (1, 3, 16, 16), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    files = _image_folder(tmp_path, one.expand(8, -1, -1, -1).contiguous())
    _, (v,), _ = next(iter(data.ViewLoader(files, 8, "minimal", 1, 8, "cpu", num_workers=0)))
    assert len({tuple(crop.flatten().tolist()) for crop in v}) == 8
    assert len(set(data._crop_seeds(0, 0, torch.arange(1000)).tolist())) == 1000


@pytest.mark.parametrize("size", [32, 96])
def test_eval_views_are_the_same_from_memory_and_from_files(tmp_path, size):
    """The eval view of an image does not depend on how its folder was loaded (by size, or by --data_on_gpu): at
    most 64 px the whole image (resized and centre-cropped to a square), as CIFAR and downsampled ImageNet are
    evaluated; above, the usual 0.875 centre crop, which the in-memory path then lacks (it is for small images)."""
    images = torch.randint(0, 256, (6, 3, 40, 52), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    split = _image_folder(tmp_path, images, size)  # non-square files, resized on load
    views = {}
    for in_memory in (True, False):
        s = data.load_split("imagefolder", str(tmp_path), "train", size, in_memory=in_memory)
        loader = data.ViewLoader(s, 6, "eval", 1, size, "cpu", shuffle=False, drop_last=False, num_workers=0)
        (idx, (views[in_memory],), _), = list(loader)
        assert torch.equal(idx, torch.arange(6))
    assert split.images is None
    if size <= data.SMALL_IMAGE:
        assert torch.equal(views[True], views[False])
    else:
        assert (views[True] - views[False]).abs().mean() > 0.05  # the file path's 0.875 crop is another view


def test_file_backed_loading_leaves_the_gpu_generators_alone(tmp_path, monkeypatch):
    """Seeding an image's crops must not reseed the GPUs: with --num_workers 0 the crops are drawn in the training
    process, whose CUDA generator seed_step has set for the step (colour jitter, mask noise, the top-k draw).
    torch.manual_seed would call torch.cuda.manual_seed_all; recorded here, so the check runs without a GPU."""
    calls = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda seed: calls.append(seed))
    files = _image_folder(tmp_path, torch.zeros(8, 3, 16, 16, dtype=torch.uint8))
    loader = data.ViewLoader(files, 4, "minimal", 2, 8, "cpu", num_workers=0)
    assert len(list(loader)) == 2 and calls == []


def test_two_views_of_an_image_are_different_crops_on_both_paths(tmp_path):
    """Each view draws its own crop and flip: the two views of one image (the positive pair of the contrastive
    loss) are almost never the same picture, in memory (augment) and from files (a transform call per view)."""
    torch.manual_seed(0)
    images = torch.randint(0, 256, (64, 3, 16, 16), dtype=torch.uint8)
    imset = data.ImageSet(images, torch.zeros(64, dtype=torch.long), ["a"], 3, (0.5,) * 3, (0.25,) * 3)
    files = _image_folder(tmp_path, images[:32])
    for ds, n in ((imset, 64), (files, 32)):
        loader = data.ViewLoader(ds, n, "minimal", 2, 16, "cpu", shuffle=False, num_workers=0)
        _, (v0, v1), _ = next(iter(loader))
        same = ((v0 - v1).abs().amax(dim=(1, 2, 3)) < 1e-3).float().mean().item()
        assert same < 0.05, (ds.images is None, same)


def test_view_loader_crop_scale_reaches_both_paths(tmp_path):
    """crop_scale (init_head/contrastive_tune --crop_min) replaces the views' default area range: at (1, 1) every
    view is the whole image, mirrored or not; at the default (0.08, 1) most are not."""
    torch.manual_seed(0)
    images = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8)
    imset = data.ImageSet(images, torch.zeros(64, dtype=torch.long), ["a"], 3, (0.5,) * 3, (0.25,) * 3)
    whole = data._normalize(images.float() / 255, imset.mean, imset.std)
    for scale, expect_whole in [((1.0, 1.0), True), (None, False)]:
        loader = data.ViewLoader(imset, 64, "minimal", 2, 32, "cpu", shuffle=False, num_workers=0, crop_scale=scale)
        _, views, _ = next(iter(loader))
        for v in views:
            same = torch.minimum((v - whole).abs().amax(dim=(1, 2, 3)), (v - whole.flip(-1)).abs().amax(dim=(1, 2, 3)))
            assert bool((same < 1e-3).all()) == expect_whole
    files = tmp_path / "train" / "a"
    files.mkdir(parents=True)
    (tmp_path / "val" / "a").mkdir(parents=True)
    for i in range(4):
        Image.fromarray(images[i].permute(1, 2, 0).numpy()).save(files / f"{i}.png")
    folder = data.load_split("imagefolder", str(tmp_path), "train", 32, in_memory=False)
    loader = data.ViewLoader(folder, 4, "minimal", 1, 32, "cpu", shuffle=False, num_workers=0, crop_scale=(1.0, 1.0))
    assert loader.loader.dataset.transform.transforms[0].scale == (1.0, 1.0)


# ---- colour ----

def test_hue_shift_matches_torchvision():
    from torchvision.transforms import functional as TF
    torch.manual_seed(0)
    x = torch.rand(6, 3, 8, 8)
    x[0] = 0.5  # grey pixels have no hue
    shift = torch.tensor([0.1, -0.1, 0.05, 0.3, -0.45, 0.0])
    ref = torch.stack([TF.adjust_hue(x[i], shift[i].item()) for i in range(6)])
    torch.testing.assert_close(data._hue_shift(x, shift), ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("channels", [3, 1])
def test_color_jitter_matches_torchvision_per_image(channels):
    # The batched jitter against torchvision's functional ops applied image by image in each image's drawn order.
    from torchvision.transforms import functional as TF
    torch.manual_seed(0)
    B = 24
    x = torch.rand(B, channels, 8, 8)
    factors = torch.stack([torch.empty(B).uniform_(lo, hi) for lo, hi in
                           [(0.6, 1.4), (0.6, 1.4), (0.8, 1.2), (-0.1, 0.1)]], dim=1)
    order = torch.rand(B, 4).argsort(dim=1)
    jitter = torch.arange(B) % 5 != 0  # a fifth is left alone
    ops = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]  # 1 channel: the last two
    ref = []
    for i in range(B):
        y = x[i]
        for op in order[i].tolist() if jitter[i] else []:  # leave a grey image alone, in torchvision too
            y = ops[op](y, factors[i, op].item())
        ref.append(y)
    out = data.color_jitter(x, factors, order, jitter)
    torch.testing.assert_close(out, torch.stack(ref), atol=1e-4, rtol=0)
    assert torch.equal(out[~jitter], x[~jitter])


def test_hue_where_shifts_only_the_active_images_on_either_path():
    torch.manual_seed(0)
    x, shift = torch.rand(10, 3, 8, 8), torch.empty(10).uniform_(-0.1, 0.1)
    active = torch.arange(10) % 3 == 0
    subset = data._hue_where(x, shift, active, whole_batch=False)  # the CPU path
    whole = data._hue_where(x, shift, active, whole_batch=True)  # the GPU path, no host sync
    torch.testing.assert_close(subset, whole, atol=1e-5, rtol=0)
    assert torch.equal(subset[~active], x[~active])
    torch.testing.assert_close(subset[active], data._hue_shift(x[active], shift[active]).clamp(0, 1))
    assert (subset[active] - x[active]).abs().amax() > 0.01


@pytest.mark.parametrize("channels", [3, 1])
def test_aug_views_shapes_and_difference(channels):
    torch.manual_seed(0)
    x = (torch.rand(16, channels, 32, 32) * 255).to(torch.uint8)
    mean, std = (0.5,) * channels, (0.25,) * channels
    views = data.augment(x, "aug", 2, 24, mean, std)
    assert len(views) == 2
    for v in views:
        assert v.shape == (16, channels, 24, 24) and v.dtype == torch.float32 and torch.isfinite(v).all()
        assert v.min() >= -2 - 1e-5 and v.max() <= 2 + 1e-5  # [0, 1] normalised with 0.5 / 0.25
    assert (views[0] - views[1]).abs().mean() > 0.05


def test_the_views_of_an_image_flip_independently():
    """Each view draws its own flip: the two views of an image are mirrored differently about half the time (one
    shared flip for both views would make it never)."""
    torch.manual_seed(0)
    ramp = torch.arange(32, dtype=torch.uint8).mul(8).expand(1000, 3, 32, 32)  # brighter to the right
    views = data.augment(ramp, "minimal", 2, 32, data.IMAGENET_MEAN, data.IMAGENET_STD)
    flipped = [v[..., :16].mean(dim=(1, 2, 3)) > v[..., 16:].mean(dim=(1, 2, 3)) for v in views]
    assert 0.4 < (flipped[0] != flipped[1]).float().mean().item() < 0.6


def test_colour_jitter_is_drawn_with_p_08_in_a_random_order_per_image(monkeypatch):
    """ColorJitter's part of BYOL's pipeline: applied with p 0.8, its four ops in an order drawn per image (a
    permutation; each op first in about a quarter of the images). The pixel tests see neither: a fixed order or
    p 1.0 still jitters every op correctly."""
    seen = {}
    jitter_fn = data.color_jitter

    def spy(x, factors, order, jitter):
        seen.update(order=order, jitter=jitter)
        return jitter_fn(x, factors, order, jitter)
    monkeypatch.setattr(data, "color_jitter", spy)
    torch.manual_seed(0)
    n = 4000
    data.color_augment(torch.rand(n, 3, 4, 4), 0)
    assert 0.77 < seen["jitter"].float().mean().item() < 0.83
    order = seen["order"]
    assert torch.equal(order.sort(dim=1).values, torch.arange(4).expand(n, 4))
    for slot in range(4):
        share = torch.bincount(order[:, slot], minlength=4) / n
        assert ((share - 0.25).abs() < 0.03).all(), (slot, share)


def test_blur_probability_per_view():
    # An impulse stays two-valued under every pointwise colour op; only the blur spreads it to its neighbours.
    # Blurs with sigma < ~0.27 move the neighbour by < 1e-3 and go unseen (~9% of them), hence the margins.
    torch.manual_seed(0)
    impulse = torch.zeros(1500, 3, 16, 16)
    impulse[..., 8, 8] = 1.0
    spread = lambda v: ((v[:, :, 8, 9] - v[:, :, 0, 0]).abs().amax(dim=1) > 1e-3).float().mean().item()
    assert spread(data.color_augment(impulse, 0)) > 0.8  # view 0: blur p 1.0
    assert 0.04 < spread(data.color_augment(impulse, 1)) < 0.16  # view 1: blur p 0.1


def test_colour_strengths_are_byols(monkeypatch):
    """The draws color_augment hands on: ColorJitter(0.4, 0.4, 0.2, 0.1), i.e. brightness and contrast factors
    in [0.6, 1.4], saturation in [0.8, 1.2], hue shifts in [-0.1, 0.1]; blur sigma in [0.1, 2.0] (BYOL, Table 6).
    The probability tests above cannot see a strength: a halved one still jitters and blurs as often."""
    seen = {}

    def spy(name, fn):  # records fn's second argument (the factors, the sigmas), then calls it
        def wrapped(x, drawn, *rest):
            seen[name] = drawn
            return fn(x, drawn, *rest)
        monkeypatch.setattr(data, fn.__name__, wrapped)
    spy("factors", data.color_jitter)
    spy("sigma", data._gaussian_blur)
    torch.manual_seed(0)
    data.color_augment(torch.rand(4000, 3, 4, 4), 0)
    for col, (lo, hi) in enumerate([(0.6, 1.4), (0.6, 1.4), (0.8, 1.2), (-0.1, 0.1)]):
        f = seen["factors"][:, col]
        assert lo <= f.min() < lo + 0.01 and hi - 0.01 < f.max() <= hi, (col, f.min(), f.max())
    assert 0.1 <= seen["sigma"].min() < 0.11 and 1.99 < seen["sigma"].max() <= 2.0


def test_crop_ratio_and_scales_are_the_references(monkeypatch, tmp_path):
    """augment() crops with torchvision's RandomResizedCrop defaults (area 0.08-1, aspect 3/4-4/3) for the stage-2/3
    views, and with MAE's area 0.2-1 for stage 1 (facebookresearch/mae main_pretrain.py). The file-backed path hands
    the same constants to torchvision's own RandomResizedCrop."""
    from torchvision import transforms as T
    ref = T.RandomResizedCrop(32)
    seen = []
    boxes = data.random_resized_crop_boxes

    def spy(B, H, W, scale, ratio, device):  # records the area and aspect ranges asked for
        seen.append((scale, ratio))
        return boxes(B, H, W, scale, ratio, device)
    monkeypatch.setattr(data, "random_resized_crop_boxes", spy)
    for views in ("mae", "minimal", "aug"):
        data.augment(torch.zeros(4, 3, 8, 8, dtype=torch.uint8), views, 1, 8, torch.zeros(1, 3, 1, 1),
                     torch.ones(1, 3, 1, 1))
    assert seen == [((0.2, 1.0), tuple(ref.ratio)), (tuple(ref.scale), tuple(ref.ratio)),
                    (tuple(ref.scale), tuple(ref.ratio))]
    for split in ("train", "val"):
        (tmp_path / split / "a").mkdir(parents=True)
        Image.new("RGB", (32, 32)).save(tmp_path / split / "a" / "0.png")
    files = data.load_split("imagefolder", str(tmp_path), "train", 32, in_memory=False)
    crop = data.ViewLoader(files, 1, "minimal", 1, 32, "cpu", num_workers=0).loader.dataset.transform.transforms[0]
    assert (tuple(crop.scale), tuple(crop.ratio)) == (tuple(ref.scale), tuple(ref.ratio))


def test_file_backed_eval_view_is_the_standard_centre_crop(tmp_path):
    """ImageNet-size folders are evaluated as every MAE/DINO evaluation does: Resize(S / 0.875, bicubic),
    CenterCrop(S), ImageNet mean and std. Checked against that torchvision pipeline on odd-sized random images, at
    S = 80 (images of at most 64 px are evaluated whole: test_eval_views_are_the_same_from_memory_and_from_files)."""
    from torchvision import transforms as T
    torch.manual_seed(0)
    ref = T.Compose([T.Resize(91, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(80), T.ToTensor(),
                     T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    expect = []
    for i, size in enumerate([(128, 96), (90, 160), (81, 81)]):
        arr = torch.randint(0, 256, (size[1], size[0], 3), dtype=torch.uint8).numpy()
        (tmp_path / "train" / "a").mkdir(parents=True, exist_ok=True)
        Image.fromarray(arr).save(tmp_path / "train" / "a" / f"{i}.png")
        expect.append(ref(Image.fromarray(arr)))
    (tmp_path / "val" / "a").mkdir(parents=True)
    files = data.load_split("imagefolder", str(tmp_path), "train", 80, in_memory=False)
    ev = data.ViewLoader(files, 3, "eval", 1, 80, "cpu", shuffle=False, drop_last=False, num_workers=0)
    _, (v,), _ = next(iter(ev))
    torch.testing.assert_close(v, torch.stack(expect), atol=1e-5, rtol=0)


def test_grey_and_solarize_probability_per_view():
    """Grey p 0.2 in both views, solarize p 0.2 in view 1 only. A saturated red stays coloured under the jitter
    (saturation >= 0.8), so equal channels mean the grey op ran. A white image stays >= 0.6 under every other
    op (brightness >= 0.6; contrast, saturation and hue leave a flat grey as it is), so < 0.5 means solarized."""
    torch.manual_seed(0)
    n = 2000
    red = torch.tensor([0.9, 0.1, 0.1]).view(1, 3, 1, 1).expand(n, 3, 8, 8)
    white = torch.ones(n, 3, 8, 8)
    for view in (0, 1):
        v = data.color_augment(red, view)
        grey = ((v - v[:, :1]).abs().amax(dim=(1, 2, 3)) < 1e-6).float().mean().item()
        assert 0.16 < grey < 0.24, (view, grey)
        solarized = (data.color_augment(white, view).amax(dim=(1, 2, 3)) < 0.5).float().mean().item()
        assert (solarized == 0) if view == 0 else (0.16 < solarized < 0.24), (view, solarized)
    # and augment(), the in-memory path of every loader, gives view 0 view 0's settings and view 1 view 1's
    v0, v1 = data.augment(torch.full((n, 3, 8, 8), 255, dtype=torch.uint8), "aug", 2, 8, torch.zeros(1, 3, 1, 1),
                          torch.ones(1, 3, 1, 1))  # white crops of white images, normalised by the identity
    solarized = [(v.amax(dim=(1, 2, 3)) < 0.5).float().mean().item() for v in (v0, v1)]
    assert solarized[0] == 0 and 0.16 < solarized[1] < 0.24, solarized


# ---- sharding ----

def _toy_set(n, size=8):
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 3, size, size).contiguous()
    return data.ImageSet(images, torch.arange(n), ["c"], 3, (0.0,) * 3, (1.0 / 255,) * 3)


def _epoch(loader):
    return [idx.clone() for idx, _, _ in loader]


def test_sharding_covers_every_index_once_and_reshuffles():
    ds = _toy_set(64)
    ranks = [data.ViewLoader(ds, 8, "eval", 1, 8, "cpu", rank=r, world_size=2, seed=3) for r in (0, 1)]
    seen = []
    for loader in ranks:
        assert len(loader) == 4
        for idx, (view,), labels in loader:
            assert idx.shape == (8,) and view.shape == (8, 3, 8, 8)
            assert torch.equal(labels, idx)  # rows stay aligned: image k holds the value k everywhere
            torch.testing.assert_close(view[:, 0, 0, 0], idx.float(), atol=1e-3, rtol=0)
            seen.append(idx)
    seen = torch.cat(seen)
    assert torch.equal(seen.sort().values, torch.arange(64))  # every index once, no overlap between ranks
    first = torch.cat(_epoch(ranks[0]))
    ranks[0].set_epoch(1)
    assert not torch.equal(first, torch.cat(_epoch(ranks[0])))
    assert not torch.equal(first, torch.arange(0, 64, 2))  # shuffled at all


def test_drop_last_false_covers_everything_and_drop_last_true_trims():
    ds = _toy_set(70)
    for shuffle in (True, False):
        loaders = [data.ViewLoader(ds, 8, "eval", 1, 8, "cpu", rank=r, world_size=2, shuffle=shuffle,
                                   drop_last=False) for r in (0, 1)]
        idx = torch.cat([i for loader in loaders for i in _epoch(loader)])
        assert torch.equal(idx.sort().values, torch.arange(70))
        assert [len(loader) for loader in loaders] == [5, 5]  # 35 per rank: 4 full batches + 3
    loaders = [data.ViewLoader(ds, 8, "eval", 1, 8, "cpu", rank=r, world_size=2) for r in (0, 1)]
    batches = [b for loader in loaders for b in _epoch(loader)]
    assert len(batches) == 8 and all(len(b) == 8 for b in batches)  # 70 // 16 = 4 batches per rank
    assert len(torch.cat(batches).unique()) == 64


@pytest.mark.parametrize("shuffle", [True, False])
def test_drop_last_trims_to_whole_batches_on_every_rank(shuffle):
    """drop_last trims the epoch to a multiple of batch_size * world_size, so every rank gets the same number of
    full batches (DDP ranks must step together). 90 images, batch 8, 2 ranks: 80 kept, 5 full batches per rank.
    (Trimming to a multiple of batch_size alone keeps 88: 44 per rank, 5 batches and a partial one of 4.)"""
    ds = _toy_set(90)
    loaders = [data.ViewLoader(ds, 8, "eval", 1, 8, "cpu", rank=r, world_size=2, shuffle=shuffle) for r in (0, 1)]
    per_rank = [_epoch(loader) for loader in loaders]
    assert [len(loader) for loader in loaders] == [5, 5]
    assert [[len(b) for b in batches] for batches in per_rank] == [[8] * 5, [8] * 5]
    idx = torch.cat([b for batches in per_rank for b in batches])
    assert len(idx) == 80 and len(idx.unique()) == 80  # disjoint ranks


def test_start_batch_resumes_the_same_epoch():
    ds = _toy_set(96)
    loader = data.ViewLoader(ds, 8, "minimal", 2, 8, "cpu", rank=1, world_size=2, seed=7)
    loader.set_epoch(5)
    full = _epoch(loader)
    loader.set_epoch(5, start_batch=2)
    tail = _epoch(loader)
    assert len(tail) == len(full) - 2 and all(torch.equal(a, b) for a, b in zip(tail, full[2:]))
    assert len(_epoch(loader)) == len(full)  # the skip was for one pass only


# ---- datasets ----

def test_synthetic_is_deterministic_balanced_and_val_differs():
    train = data.load_split("synthetic", None, "train", 32, seed=0)
    again = data.load_split("synthetic", None, "train", 32, seed=0)
    val = data.load_split("synthetic", None, "val", 32, seed=0)
    other = data.load_split("synthetic", None, "train", 32, seed=1)
    assert train.images.shape == (5000, 3, 32, 32) and train.images.dtype == torch.uint8
    assert val.images.shape == (1000, 3, 32, 32) and len(train.classes) == 10 and train.labels.dtype == torch.int64
    assert torch.equal(train.images, again.images) and torch.equal(train.labels, again.labels)
    assert not torch.equal(train.images[:1000], val.images) and not torch.equal(train.images, other.images)
    train_rows = {bytes(im.numpy()) for im in train.images}
    assert not any(bytes(im.numpy()) in train_rows for im in val.images)  # no val image is a train image
    counts = torch.bincount(train.labels, minlength=10)
    assert counts.min() >= 400 and counts.max() <= 600
    assert train.images.float().std() > 40  # real contrast, not a flat image
    assert data.load_split("synthetic", None, "val", 48).images.shape == (1000, 3, 48, 48)


def test_synthetic_no_small_crop_is_flat():
    """The shapes are tiled, so a crop of ~8% of the area (9 x 9 of 32 x 32, stage 3's smallest) holds shape and
    background, not a flat patch. Measured: 0.2% of such windows are flat; the untiled shapes of before session 11
    (one shape at a random place) had 31%."""
    images, _ = data.make_synthetic(500, 32, 3)
    windows = images[:, 0].float().unfold(1, 9, 1).unfold(2, 9, 1)  # (500, 24, 24, 9, 9): every 9 x 9 window
    spread = windows.amax((-1, -2)) - windows.amin((-1, -2))  # shape vs background: >= 0.2 * 255 = 51 apart
    assert (spread < 40).float().mean() < 0.01


def test_unknown_dataset_and_missing_path_raise_data_error(tmp_path):
    with pytest.raises(data.DataError, match="cifar10"):
        data.load_split("mnist", None, "train", 32)
    with pytest.raises(data.DataError, match="data_path"):
        data.load_split("imagefolder", None, "train", 32)
    with pytest.raises(data.DataError, match="does not exist"):
        data.load_split("imagefolder", str(tmp_path / "nope"), "train", 32)
    (tmp_path / "train" / "a").mkdir(parents=True)
    with pytest.raises(data.DataError, match="val/"):
        data.load_split("imagefolder", str(tmp_path), "train", 32)
    (tmp_path / "val" / "a").mkdir(parents=True)
    with pytest.raises(data.DataError, match="no valid file"):  # class folders without any image
        data.load_split("imagefolder", str(tmp_path), "train", 32)


def _png(path, mode, size=(32, 32), color=100):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path)


def test_imagefolder_val_class_not_in_train(tmp_path):
    _png(tmp_path / "train" / "cat" / "0.png", "RGB")
    _png(tmp_path / "val" / "cat" / "0.png", "RGB")
    _png(tmp_path / "val" / "dog" / "0.png", "RGB")
    with pytest.raises(data.DataError, match="val/ has classes not in train/: dog"):
        data.load_split("imagefolder", str(tmp_path), "val", 32)


def test_imagefolder_modes_resize_bad_files_and_label_alignment(tmp_path):
    for split in ("train", "val"):
        _png(tmp_path / split / "a" / "grey.png", "L", color=50)
        _png(tmp_path / split / "b" / "rgba.png", "RGBA", color=(10, 20, 30, 0))
        _png(tmp_path / split / "c" / "big.png", "RGB", size=(50, 40), color=(200, 0, 0))
    (tmp_path / "train" / "a" / "broken.png").write_bytes(b"not a png")  # sorts first in class a
    _png(tmp_path / "val" / "b" / "extra.png", "RGB", color=(0, 0, 250))
    with pytest.warns(UserWarning, match=r"skipped 1 unreadable image.*broken\.png"):
        train = data.load_split("imagefolder", str(tmp_path), "train", 32)
    assert train.images.shape == (3, 3, 32, 32) and train.images.dtype == torch.uint8
    assert train.labels.tolist() == [0, 1, 2]  # the broken image's label went with it
    assert train.images[0].unique().tolist() == [50]  # grey -> 3 equal channels
    assert train.images[1, :, 0, 0].tolist() == [10, 20, 30]  # alpha dropped
    assert train.images[2, :, 5, 5].tolist() == [200, 0, 0]  # 50x40 -> resized and centre-cropped to 32x32
    val = data.load_split("imagefolder", str(tmp_path), "val", 32)
    assert val.labels.tolist() == [0, 1, 1, 2] and val.classes == ["a", "b", "c"]


@pytest.fixture(scope="module")
def cifar5k_train():
    return data.load_split("imagefolder", str(CIFAR5K), "train", 32)


@needs_cifar5k
def test_imagefolder_cifar10_5k_in_memory(cifar5k_train):
    val = data.load_split("imagefolder", str(CIFAR5K), "val", 32)
    for ds, n in ((cifar5k_train, 4000), (val, 1000)):
        assert ds.folder is None and ds.images.shape == (n, 3, 32, 32) and ds.images.dtype == torch.uint8
        assert len(ds) == n and ds.classes[0] == "airplane" and len(ds.classes) == 10
        assert torch.bincount(ds.labels, minlength=10).min() > n // 20
    assert 100 < cifar5k_train.images.float().mean() < 140  # real photos, CIFAR-10's mean is ~120


@needs_cifar5k
def test_file_backed_path_matches_in_memory_labels(cifar5k_train):
    files = data.load_split("imagefolder", str(CIFAR5K), "train", 32, in_memory=False)
    assert files.images is None and len(files) == 4000 and torch.equal(files.labels, cifar5k_train.labels)
    loader = data.ViewLoader(files, 64, "aug", 2, 32, "cpu", rank=1, world_size=2, num_workers=0)
    assert len(loader) == 4000 // 128
    expect = data._shard_indices(4000, 64, 2, 1, 0, 0, True, True)[:128]
    for b, (idx, views, labels) in zip(range(2), loader):
        assert torch.equal(idx, expect[b * 64:(b + 1) * 64]) and torch.equal(labels, files.labels[idx])
        assert len(views) == 2 and all(v.shape == (64, 3, 32, 32) and v.dtype == torch.float32 for v in views)
    # "eval" on 32-px files: Resize(36) + CenterCrop(32), in file order.
    ev = data.ViewLoader(files, 50, "eval", 1, 32, "cpu", shuffle=False, drop_last=False, num_workers=0)
    idx, (v,), _ = next(iter(ev))
    assert torch.equal(idx, torch.arange(50)) and v.shape == (50, 3, 32, 32)
    plain = data._normalize(cifar5k_train.images[:50].float() / 255, files.mean, files.std)
    assert (v - plain).abs().mean() < 0.5  # the same photos, slightly zoomed


def test_fashion_mnist_offline(tmp_path):
    if not data.DEBIAN_FASHION_MNIST.is_dir():
        pytest.skip(f"{data.DEBIAN_FASHION_MNIST} absent (apt-get install dataset-fashion-mnist)")
    train = data.load_split("fashion_mnist", str(tmp_path), "train", 28)
    val = data.load_split("fashion_mnist", str(tmp_path), "val", 28)
    assert (tmp_path / "FashionMNIST" / "raw" / "t10k-images-idx3-ubyte").is_file()
    assert train.images.shape == (60000, 1, 28, 28) and val.images.shape == (10000, 1, 28, 28)
    assert train.images.dtype == torch.uint8 and train.channels == 1 and train.mean == (0.2860,)
    assert torch.bincount(train.labels).tolist() == [6000] * 10
    assert abs(train.images.float().mean().item() / 255 - 0.2860) < 0.001  # the published mean
    (v,) = data.augment(train.images[:8], "aug", 1, 28, train.mean, train.std)
    assert v.shape == (8, 1, 28, 28)
    (e,) = data.augment(train.images[:8], "eval", 1, 32, train.mean, train.std)  # resized if asked for
    assert e.shape == (8, 1, 32, 32)


def test_helpers_and_view_validation():
    assert [data.default_img_size(d) for d in data.DATASETS] == [32, 32, 28, 224, 32]
    assert [data.num_channels(d) for d in data.DATASETS] == [3, 3, 1, 3, 3]
    with pytest.raises(data.DataError, match="views"):
        data.ViewLoader(_toy_set(8), 4, "simclr", 2, 8, "cpu")


@needs_cifar5k
def test_small_image_folder_keeps_its_size_by_default(tmp_path):
    assert data.default_img_size("imagefolder", str(CIFAR5K)) == 32  # 32-px PNGs: not blown up to 224
    big = tmp_path / "train" / "a"
    big.mkdir(parents=True)
    from PIL import Image
    Image.new("RGB", (300, 200)).save(big / "0.png")
    assert data.default_img_size("imagefolder", str(tmp_path)) == 224
