"""
Datasets and augmented views for every stage of MAE-CT.

Two things live here:
  1. load_split(...) -> ImageSet: one split of a dataset, as a uint8 (N, C, H, W) tensor held in memory
     (CIFAR-10/100, Fashion-MNIST, synthetic shapes, small image folders) or, for ImageNet-size folders, a
     file-backed torchvision ImageFolder.
  2. ViewLoader: yields (idx, views, labels) batches, where views is a list of n_views augmented, normalised
     float32 tensors (B, C, S, S) on the device. Kinds of views (SPEC.md):
       "mae"     RandomResizedCrop(scale 0.2-1, bicubic) + flip              stage 1 (MAE pre-training)
       "minimal" RandomResizedCrop(scale 0.08-1, bicubic) + flip             stages 2/3 (MAE-CT)
       "aug"     "minimal" + the BYOL colour pipeline                        stages 2/3 (MAE-CT_aug)
       "eval"    resize + centre crop to S (from S/0.875 when S > 64)         feature extraction
     ViewLoader(crop_scale=(a, b)) overrides the crop scale (stages 2/3: --crop_min a, b = 1).

In-memory data is moved to the device once and augmented there in batches with torch ops (the
"GPU-resident" recipe of airbench): a batch of crops + flips is ONE grid_sample call, so no DataLoader
workers are needed and small-image epochs take seconds. File-backed data goes through an ordinary
DataLoader with per-sample torchvision crops; colour and normalisation still run batched on the device.

Both paths shard an epoch the same way: one permutation from a generator seeded with (seed, epoch), equal on
every rank, dealt out as perm[rank::world_size]. In-memory augmentation draws from the default torch RNG of the
device, which the training scripts reseed every step; file-backed crops draw from a seed of (seed, epoch, image),
whatever worker loads the image. Either way a resumed run sees the same views as an uninterrupted one.

Offline Fashion-MNIST: Debian's package `dataset-fashion-mnist` installs the four IDX files, re-gzipped, in
/usr/share/datasets/fashion-mnist/. torchvision's md5 check rejects those .gz files, so when the root has no
FashionMNIST/raw/ files yet, we decompress them there (root = data_path or ~/.cache/mae-ct) and load with
download=False.
"""

import gzip
import math
import os
import shutil
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

DATASETS = ("cifar10", "cifar100", "fashion_mnist", "imagefolder", "synthetic")
VIEWS = ("mae", "minimal", "aug", "eval")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
FASHION_MEAN, FASHION_STD = (0.2860,), (0.3530,)
DEFAULT_ROOT = Path.home() / ".cache" / "mae-ct"  # where CIFAR / Fashion-MNIST go when no --data_path
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
CROP_SCALE = {"mae": (0.2, 1.0), "minimal": (0.08, 1.0), "aug": (0.08, 1.0)}  # RandomResizedCrop scale
CROP_RATIO = (3 / 4, 4 / 3)
# Images at most this many pixels a side (CIFAR, Fashion-MNIST, downsampled ImageNet) are evaluated whole, and an
# image folder of them with at most IN_MEMORY_MAX images is held in memory; larger images get the 0.875 centre crop.
SMALL_IMAGE, IN_MEMORY_MAX = 64, 200_000
SYNTHETIC_SIZES = {"train": 5000, "val": 1000}
SYNTHETIC_CLASSES = ["disc", "square", "triangle", "ring", "plus", "hbar", "vbar", "diamond", "x", "two_dots"]


class DataError(Exception):
    """Bad data input; the scripts print `error: <message>` and exit 2."""


@dataclass
class ImageSet:
    images: torch.Tensor | None  # uint8 (N, C, H, W) when held in memory, else None
    labels: torch.Tensor  # int64 (N,)
    classes: list[str]
    channels: int  # 1 for Fashion-MNIST, else 3
    mean: tuple[float, ...]  # per-channel normalisation constants
    std: tuple[float, ...]
    folder: object | None = None  # torchvision ImageFolder when file-backed, else None

    def __len__(self):
        return len(self.labels)

    def describe(self):
        """One phrase for the config line, e.g. '5000 images, 10 classes, in memory'."""
        return f"{len(self)} images, {len(self.classes)} classes, " + ("files" if self.images is None else "in memory")


def default_img_size(dataset: str, data_path: str | None = None) -> int:
    """32 for CIFAR/synthetic, 28 for Fashion-MNIST; an image folder of small images (the first training image
    at most 64 px a side, e.g. the CIFAR-10 subset) keeps their size, any other folder gets 224."""
    if dataset == "imagefolder" and data_path:
        from PIL import Image
        first = next(iter(sorted((Path(data_path) / "train").glob("*/*"))), None)
        if first is not None:
            try:
                with Image.open(first) as im:
                    if max(im.size) <= SMALL_IMAGE and im.size[0] == im.size[1]:
                        return im.size[0]
            except OSError:
                pass  # unreadable: the loader reports it properly
    return {"fashion_mnist": 28, "imagefolder": 224}.get(dataset, 32)


def num_channels(dataset: str) -> int:
    return 1 if dataset == "fashion_mnist" else 3


def check_dataset(dataset: str):
    if dataset not in DATASETS:
        raise DataError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")


def input_data(args, ck_args: dict, cfg: dict, init_from: str):
    """Stages 2-3 and evaluate.py, before anything starts: --dataset and --data_path default to the ones the input
    checkpoint was trained on (an official MAE file does not say: it needs --dataset), --img_size to its encoder's,
    and the images must fit that encoder."""
    args.dataset = args.dataset or ck_args.get("dataset")
    if args.dataset is None:
        raise DataError(f"{init_from} does not say what it was trained on: pass --dataset")
    if args.data_path is None and args.dataset == ck_args.get("dataset"):
        args.data_path = ck_args.get("data_path")
    check_dataset(args.dataset)
    args.img_size = args.img_size or cfg["img_size"]
    if args.img_size != cfg["img_size"] or cfg["in_chans"] != num_channels(args.dataset):
        raise DataError(f"{init_from} takes {cfg['in_chans']}-channel {cfg['img_size']} px images; "
                        f"{args.dataset} at --img_size {args.img_size} does not fit")


# ---- loading ----

def load_split(dataset: str, data_path: str | None, split: str, img_size: int,
               in_memory: bool | None = None, seed: int = 0) -> ImageSet:
    """Load split "train" or "val". in_memory only matters for "imagefolder" (None = decide by size)."""
    check_dataset(dataset)
    if split not in ("train", "val"):
        raise DataError(f"unknown split {split!r}; choose train or val")
    mean, std = (FASHION_MEAN, FASHION_STD) if dataset == "fashion_mnist" else (IMAGENET_MEAN, IMAGENET_STD)
    if dataset == "imagefolder":
        return _load_imagefolder(data_path, split, img_size, in_memory, mean, std)
    if dataset == "synthetic":
        images, labels = make_synthetic(SYNTHETIC_SIZES[split], img_size, seed * 2 + (split == "val"))
        classes = SYNTHETIC_CLASSES
    else:
        ds = _torchvision_dataset(dataset, Path(data_path) if data_path else DEFAULT_ROOT, split == "train")
        if dataset == "fashion_mnist":
            images = ds.data.unsqueeze(1)  # (N, 28, 28) -> (N, 1, 28, 28)
        else:
            images = torch.from_numpy(ds.data).permute(0, 3, 1, 2)  # (N, 32, 32, 3) -> (N, 3, 32, 32)
        labels, classes = torch.as_tensor(ds.targets), list(ds.classes)
    return ImageSet(_resize_stack(images, img_size), labels.long(), classes, num_channels(dataset), mean, std)


def _resize_stack(images, size):
    """Store in-memory images at the training size once, so crops are only ever up-sampled (no aliasing)."""
    if images.shape[-1] == size and images.shape[-2] == size:
        return images.contiguous()
    out = F.interpolate(images.float(), size=(size, size), mode="bicubic", antialias=True, align_corners=False)
    return out.round().clamp(0, 255).to(torch.uint8)


def _torchvision_dataset(dataset, root, train):
    from torchvision import datasets
    cls = {"cifar10": datasets.CIFAR10, "cifar100": datasets.CIFAR100, "fashion_mnist": datasets.FashionMNIST}
    if dataset == "fashion_mnist":
        _unpack_debian_fashion_mnist(root)
    try:
        return cls[dataset](root=str(root), train=train, download=False)
    except RuntimeError:  # "Dataset not found": try the internet once
        pass
    try:
        return cls[dataset](root=str(root), train=train, download=True)
    except Exception as e:
        hint = " or pass --data_path" if Path(root) == DEFAULT_ROOT else ""
        if dataset == "fashion_mnist":
            hint += f" (offline: apt-get install dataset-fashion-mnist puts them in {DEBIAN_FASHION_MNIST})"
        raise DataError(f"{dataset} not found under {root} and download failed ({type(e).__name__}); put the "
                        f"torchvision {cls[dataset].__name__} files there{hint}") from None


def _unpack_debian_fashion_mnist(root):
    raw = Path(root) / "FashionMNIST" / "raw"
    names = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]
    if all((raw / n).exists() for n in names) or not DEBIAN_FASHION_MNIST.is_dir():
        return
    raw.mkdir(parents=True, exist_ok=True)
    for n in names:
        with gzip.open(DEBIAN_FASHION_MNIST / f"{n}.gz", "rb") as src, open(raw / f"{n}.tmp", "wb") as dst:
            shutil.copyfileobj(src, dst)
        os.replace(raw / f"{n}.tmp", raw / n)  # a killed unpack never leaves a half file under the real name


def _load_imagefolder(data_path, split, img_size, in_memory, mean, std):
    from torchvision.datasets import ImageFolder
    if not data_path:
        raise DataError("--data_path is required for imagefolder (a folder with train/ and val/ subfolders)")
    root = Path(data_path)
    if not root.is_dir():
        raise DataError(f"data path {root} does not exist")
    for sub in ("train", "val"):
        if not (root / sub).is_dir():
            raise DataError(f"{root} has no {sub}/ folder (expected {root}/{sub}/<class>/<image>)")
    # Class ids always come from train/, so val labels mean the same classes. Listing the folder names is
    # enough; ImageFolder sorts them the same way.
    train_classes = sorted(e.name for e in os.scandir(root / "train") if e.is_dir())
    broken = sorted(e.name for e in os.scandir(root / split) if e.is_symlink() and not os.path.exists(e.path))
    if broken:  # a class folder linked to nowhere would silently leave the class out
        raise DataError(f"{root / split} has broken links: {', '.join(broken[:5])}{' ...' if len(broken) > 5 else ''}")
    try:
        folder = ImageFolder(str(root / split))
    except (FileNotFoundError, RuntimeError) as e:
        raise DataError(f"{root / split}: {e}") from None
    extra = sorted(set(folder.classes) - set(train_classes))
    if extra:
        raise DataError(f"val/ has classes not in train/: {', '.join(extra[:5])}{' ...' if len(extra) > 5 else ''}")
    class_to_idx = {c: i for i, c in enumerate(train_classes)}
    folder.samples = [(p, class_to_idx[folder.classes[t]]) for p, t in folder.samples]
    folder.imgs, folder.targets = folder.samples, [t for _, t in folder.samples]
    folder.classes, folder.class_to_idx = train_classes, class_to_idx
    if in_memory is None:  # small images of a small set fit in (GPU) memory: 200k x 64 x 64 x 3 = 2.5 GB
        in_memory = img_size <= SMALL_IMAGE and len(folder.samples) <= IN_MEMORY_MAX
    if not in_memory:
        return ImageSet(None, torch.tensor(folder.targets), train_classes, 3, mean, std, folder=folder)

    # Read every image once: PIL decodes outside the GIL, so a few threads help.
    with ThreadPoolExecutor(max_workers=min(16, 2 * (os.cpu_count() or 1))) as pool:
        arrays = list(pool.map(lambda s: _read_square(s[0], img_size), folder.samples))
    keep = [i for i, a in enumerate(arrays) if a is not None]
    if len(keep) < len(arrays):
        first_bad = next(p for (p, _), a in zip(folder.samples, arrays) if a is None)
        warnings.warn(f"skipped {len(arrays) - len(keep)} unreadable image(s) in {root / split}, first: {first_bad}")
    if not keep:
        raise DataError(f"no readable images in {root / split}")
    images = torch.from_numpy(np.stack([arrays[i] for i in keep])).permute(0, 3, 1, 2)  # (N,S,S,3) -> (N,3,S,S)
    labels = torch.tensor([folder.targets[i] for i in keep])  # stays aligned with the kept images
    return ImageSet(images.contiguous(), labels, train_classes, 3, mean, std)


def _read_square(path, size):
    """PIL image -> uint8 (size, size, 3), or None when unreadable. Resize shorter side + centre crop."""
    from PIL import Image
    from torchvision.transforms import functional as TF
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")  # grey, palette and RGBA all become 3 channels; forces a full decode
    except (OSError, ValueError):
        return None
    if im.size != (size, size):  # 32-px CIFAR PNGs at size 32 are left untouched
        im = TF.center_crop(TF.resize(im, size, interpolation=TF.InterpolationMode.BICUBIC), size)
    return np.asarray(im, dtype=np.uint8)


def make_synthetic(n: int, size: int, seed: int):
    """n images of 10 tiled shapes (class = the shape, repeated over the whole image) -> uint8 (n, 3, size, size),
    int64 (n,). Deterministic.

    Each image tiles one of 10 shapes with a random period (7-12 px at 32 px: 2.7-4.6 tiles a side) and a random
    phase. Every crop that stage 3 takes (>= 8% of the area: at least about half a tile) shows part of the pattern,
    as a crop of an object-centric photo mostly shows part of the object; that is the premise of MAE-CT's positives
    (a crop's nearest neighbour should share the object). With one shape at a random place instead, a crop was often
    background only, its nearest neighbour had the query's class 23% of the time (tiled: 39-44%), and MAE-CT stayed
    equal to its MAE (RESULTS.md). Phase and period lower raw-pixel k-NN@10 to 66% (one shape: 84%).
    """
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(n) % 10)  # balanced classes in random order
    period = rng.uniform(7, 12, n).astype(np.float32) * (size / 32)  # tile side in pixels
    ox, oy = rng.uniform(0, 1, (2, n)).astype(np.float32)  # phase, in tiles (float32 throughout: fast)
    grid = np.arange(size, dtype=np.float32) + 0.5  # pixel centres
    # Coordinates within the tile, in [-1, 1], scaled so that the shape fills 85% of its tile.
    u = ((grid[None, None, :] / period[:, None, None] + ox[:, None, None]) % 1 * 2 - 1) / 0.85  # (n, 1, S)
    v = ((grid[None, :, None] / period[:, None, None] + oy[:, None, None]) % 1 * 2 - 1) / 0.85  # (n, S, 1)
    u, v = np.broadcast_to(u, (n, size, size)), np.broadcast_to(v, (n, size, size))
    au, av, r = np.abs(u), np.abs(v), np.sqrt(u * u + v * v)
    shapes = [
        lambda k: r[k] <= 1,  # disc
        lambda k: np.maximum(au[k], av[k]) <= 0.8,  # square
        lambda k: (av[k] <= 0.9) & (au[k] <= 0.5 * (v[k] + 0.9)),  # triangle, apex up
        lambda k: (r[k] <= 1) & (r[k] >= 0.55),  # ring
        lambda k: ((au[k] <= 0.25) | (av[k] <= 0.25)) & (np.maximum(au[k], av[k]) <= 1),  # plus
        lambda k: (av[k] <= 0.3) & (au[k] <= 1),  # horizontal bar
        lambda k: (au[k] <= 0.3) & (av[k] <= 1),  # vertical bar
        lambda k: au[k] + av[k] <= 1,  # diamond
        lambda k: (np.abs(au[k] - av[k]) <= 0.3) & (np.maximum(au[k], av[k]) <= 0.9),  # X: both diagonals
        lambda k: (au[k] - 0.5) ** 2 + av[k] ** 2 <= 0.16,  # two dots (|u| folds the left dot onto the right)
    ]
    mask = np.zeros((n, size, size), dtype=bool)
    for c, shape in enumerate(shapes):
        k = labels == c
        mask[k] = shape(k)
    # A light grey shape ([0.6, 1]) on a dark grey background ([0, 0.4]), levels random per image. With random hues
    # and a random polarity, a minutes-long ViT-nano MAE encoded little but the two colours: its mean-pooled features
    # were at the level of a random encoder (k-NN@10 15%); with grey levels the same MAE reached 48% (RESULTS.md).
    bg = rng.uniform(0, 0.4, (n, 1)).repeat(3, axis=1).astype(np.float32)
    fg = rng.uniform(0.6, 1, (n, 1)).repeat(3, axis=1).astype(np.float32)
    img = np.where(mask[:, None], fg[:, :, None, None], bg[:, :, None, None])  # (n, 3, S, S)
    img += 0.03 * rng.standard_normal(img.shape, dtype=np.float32)  # a little noise, as in real photos
    images = torch.from_numpy((img.clip(0, 1) * 255 + 0.5).astype(np.uint8))  # +0.5: round to nearest
    return images, torch.from_numpy(labels).long()


# ---- batched augmentation on the device ----

def random_resized_crop_boxes(n, height, width, scale, ratio, device):
    """RandomResizedCrop.get_params for n images at once -> float (n, 4) boxes (top, left, h, w), integer-valued.

    As torchvision: up to 10 tries of area ~ U(scale) * H * W and log-uniform aspect ratio w/h; the first try
    that fits is used, else the centre crop with the aspect ratio clamped into the ratio range.
    """
    area = height * width
    log_r = torch.empty(n, 10, device=device).uniform_(math.log(ratio[0]), math.log(ratio[1]))
    target = torch.empty(n, 10, device=device).uniform_(scale[0], scale[1]) * area
    w = torch.sqrt(target * torch.exp(log_r)).round()  # (n, 10) candidates
    h = torch.sqrt(target / torch.exp(log_r)).round()
    ok = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = ok.int().argmax(dim=1, keepdim=True)  # index of the first valid try (0 if none)
    w, h, found = w.gather(1, first)[:, 0], h.gather(1, first)[:, 0], ok.any(dim=1)
    # Fallback: the whole image, narrowed to the nearest allowed aspect ratio, centred.
    in_ratio = width / height
    if in_ratio < ratio[0]:
        fw, fh = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        fw, fh = round(height * ratio[1]), height
    else:
        fw, fh = width, height
    w, h = torch.where(found, w, float(fw)), torch.where(found, h, float(fh))
    # Uniform integer position; clamp because rand * k can round up to k in float32.
    top = (torch.rand(n, device=device) * (height - h + 1)).floor().clamp(max=height - h)
    left = (torch.rand(n, device=device) * (width - w + 1)).floor().clamp(max=width - w)
    top, left = torch.where(found, top, float((height - fh) // 2)), torch.where(found, left, float((width - fw) // 2))
    return torch.stack([top, left, h, w], dim=1)


def crop_resize_flip(x, boxes, flip, out_size):
    """Crop boxes (top, left, h, w) out of float x (B, C, H, W), resize to out_size (bicubic) and mirror the
    images where flip is True, all in one grid_sample -> (B, C, out_size, out_size). No antialiasing: our
    in-memory images are stored at out_size, so crops are only ever enlarged."""
    B, C, H, W = x.shape
    top, left, h, w = boxes.to(x.dtype).unbind(1)
    theta = torch.zeros(B, 2, 3, device=x.device, dtype=x.dtype)
    # affine_grid maps output coords in [-1, 1] to input coords in [-1, 1] (align_corners=False: -1 and 1
    # are the outer pixel edges). Scale = crop size / image size, shift = crop centre; -1 scale mirrors.
    theta[:, 0, 0] = w / W * torch.where(flip, -1.0, 1.0).to(x.dtype)
    theta[:, 0, 2] = 2 * (left + w / 2) / W - 1
    theta[:, 1, 1] = h / H
    theta[:, 1, 2] = 2 * (top + h / 2) / H - 1
    grid = F.affine_grid(theta, [B, C, out_size, out_size], align_corners=False)  # (B, S, S, 2)
    return F.grid_sample(x, grid, mode="bicubic", padding_mode="border", align_corners=False)


def _gray(x):  # (B, 3, H, W) -> (B, 1, H, W), ITU-R 601 luma (torchvision: 0.2989 for red, 4e-5 apart)
    return (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])


def _hue_shift(x, shift):
    """Rotate hue of RGB x (B, 3, H, W) in [0, 1] by shift (B,) turns, via HSV."""
    v, _ = x.max(dim=1)  # (B, H, W)
    c = v - x.min(dim=1).values  # chroma
    r, g, b = x.unbind(1)
    safe_c = torch.where(c > 0, c, torch.ones_like(c))
    h = torch.where(v == r, ((g - b) / safe_c) % 6, torch.where(v == g, (b - r) / safe_c + 2, (r - g) / safe_c + 4))
    h = (h / 6 + shift[:, None, None]) % 1  # grey pixels (c == 0) have no hue; any h gives back grey
    # HSV -> RGB: channel n in (r=5, g=3, b=1) is v - c * clamp(min(k, 4 - k), 0, 1) with k = (n + 6h) mod 6
    n = torch.arange(5.0, 0.0, -2.0, device=x.device).view(1, 3, 1, 1)  # (5, 3, 1) made on the device, no copy
    k = (n + 6 * h[:, None]) % 6  # (B, 3, H, W)
    return v[:, None] - c[:, None] * torch.minimum(k, 4 - k).clamp(0, 1)


def _hue_where(x, shift, active, whole_batch=None):
    """_hue_shift on the images where active (B,) is True; the others come back unchanged.

    Hue is the dearest colour op, and an image has it in one of the four jitter slots or in none. On CPU only the
    active images are computed: hue over the whole batch in every slot was 2/3 of the CPU time of the colour
    pipeline. On a GPU (whole_batch) the whole batch goes through with shift 0 for the others, as boolean indexing
    would make the step wait for the GPU (a host sync).
    """
    if whole_batch is None:
        whole_batch = x.device.type != "cpu"
    if whole_batch:
        return _hue_shift(x, torch.where(active, shift, 0.0)).clamp(0, 1)
    i = active.nonzero()[:, 0]
    return x.index_put((i,), _hue_shift(x[i], shift[i]).clamp(0, 1).to(x.dtype))


def _gaussian_blur(x, sigma):
    """Blur each image of x (B, C, H, W) with its own sigma (B,); kernel ~10% of the side (BYOL: 23 at 224).
    sigma keeps BYOL's pixel range at every size, so on 28-32 px images the 3-tap kernel caps the blur near a 3x3 box
    ([0.32, 0.36, 0.32] at sigma 2): stronger than BYOL's relative to the image, weaker than an untruncated sigma 2."""
    B, C, H, W = x.shape
    k = max(3, int(0.1 * H) // 2 * 2 + 1)
    t = torch.arange(k, device=x.device, dtype=x.dtype) - k // 2
    kern = torch.exp(-t[None] ** 2 / (2 * sigma[:, None] ** 2))  # (B, k)
    kern = (kern / kern.sum(1, keepdim=True)).repeat_interleave(C, 0)  # (B*C, k): one kernel per channel
    y = F.pad(x.reshape(1, B * C, H, W), [k // 2] * 4, mode="reflect")
    y = F.conv2d(y, kern[:, None, :, None], groups=B * C)  # vertical pass, separable
    y = F.conv2d(y, kern[:, None, None, :], groups=B * C)  # horizontal pass
    return y.reshape(B, C, H, W)


def color_jitter(x, factors, order, jitter):
    """ColorJitter(0.4, 0.4, 0.2, 0.1) on float x (B, C, H, W) in [0, 1], batched, with the draws given.

    factors (B, 4): brightness, contrast, saturation, hue factors; order (B, 4): each image's op order (a
    permutation of 0-3, as torchvision draws one per call); jitter (B,) bool: the images jittered at all. Like
    torchvision, each op clamps to [0, 1]. The batch goes through four slots; in each, every image gets its own op
    or none. Brightness, contrast and saturation are each a blend f * x + (1 - f) * target with a target of
    black, the image's mean grey level, or its grey image, so a slot is one blend (f = 1 where the image's op is
    another or there is none) and then the hue. For 1-channel images only brightness and contrast apply.
    """
    B, C = x.shape[:2]
    n_blends = 3 if C == 3 else 2
    for slot in range(4):
        op = torch.where(jitter, order[:, slot], -1)  # (B,): this slot's op per image, -1 for none
        blend = (op >= 0) & (op < n_blends)
        f = torch.where(blend, factors.gather(1, op.clamp(0, 2)[:, None])[:, 0], 1.0).view(B, 1, 1, 1)
        grey = _gray(x) if C == 3 else x  # (B, 1, H, W)
        op4 = op.view(B, 1, 1, 1)
        target = torch.where(op4 == 1, grey.mean(dim=(1, 2, 3), keepdim=True), torch.where(op4 == 2, grey, 0.0))
        x = (f * x + (1 - f) * target).clamp(0, 1)
        if C == 3:
            x = _hue_where(x, factors[:, 3], op == 3)
    return x


def color_augment(x, view_index):
    """BYOL colour pipeline on float x (B, C, H, W) in [0, 1] (Grill et al. 2020, Table 6; SPEC "aug").

    View 0: jitter p 0.8, grey p 0.2, blur p 1.0, no solarize. View 1: same but blur p 0.1, solarize p 0.2.
    For 1-channel images hue, saturation and grey are meaningless and skipped.
    """
    B, C = x.shape[:2]
    dev = x.device
    coin = lambda p: (torch.rand(B, device=dev) < p)[:, None, None, None]  # (B, 1, 1, 1) per-image coin
    uni = lambda lo, hi: torch.empty(B, device=dev).uniform_(lo, hi)
    # Colour jitter, p 0.8, the four ops in a random order per image (as torchvision's ColorJitter).
    jitter = coin(0.8)[:, 0, 0, 0]
    factors = torch.stack([uni(0.6, 1.4), uni(0.6, 1.4), uni(0.8, 1.2), uni(-0.1, 0.1)], dim=1)
    order = torch.rand(B, 4, device=dev).argsort(dim=1)  # (B, 4) random op order per image
    x = color_jitter(x, factors, order, jitter)
    if C == 3:
        x = torch.where(coin(0.2), _gray(x).expand(-1, 3, -1, -1), x)
    blurred = _gaussian_blur(x, uni(0.1, 2.0))
    x = torch.where(coin(1.0 if view_index == 0 else 0.1), blurred, x)
    if view_index != 0:
        x = torch.where(coin(0.2), torch.where(x >= 0.5, 1 - x, x), x)
    return x


def _normalize(x, mean, std):
    mean = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    std = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - mean) / std


def augment(x_uint8, views, n_views, img_size, mean, std, crop_scale=None):
    """uint8 batch (B, C, H, W) on any device -> list of n_views normalised float32 (B, C, img_size, img_size).

    Views with an even index get view 0's colour settings and odd ones view 1's (only "aug" differs).
    crop_scale: RandomResizedCrop's area range (default CROP_SCALE[views]).
    """
    x = x_uint8.float() / 255
    if views == "eval":  # load_split already stored the images at img_size; resize only if the caller differs
        if x.shape[-1] != img_size or x.shape[-2] != img_size:
            x = F.interpolate(x, size=(img_size, img_size), mode="bicubic", antialias=True).clamp(0, 1)
        return [_normalize(x, mean, std)] * n_views
    B, _, H, W = x.shape
    out = []
    for i in range(n_views):
        boxes = random_resized_crop_boxes(B, H, W, crop_scale or CROP_SCALE[views], CROP_RATIO, x.device)
        flip = torch.rand(B, device=x.device) < 0.5
        v = crop_resize_flip(x, boxes, flip, img_size).clamp(0, 1)  # bicubic overshoots a little
        if views == "aug":
            v = color_augment(v, i % 2)
        out.append(_normalize(v, mean, std))
    return out


# ---- batches ----

def _shard_indices(n, batch_size, world_size, rank, seed, epoch, shuffle, drop_last):
    """This rank's dataset indices for one epoch (int64, CPU). The permutation is the same on every rank."""
    if shuffle:
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
    else:
        perm = torch.arange(n)
    if drop_last:  # every rank gets the same number of full batches
        perm = perm[: n // (batch_size * world_size) * batch_size * world_size]
    return perm[rank::world_size]


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)  # 2**64 / golden ratio, splitmix64's increment


def _mix64(x):
    """splitmix64's finaliser on a uint64 array: every input bit reaches every output bit."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _crop_seeds(seed, epoch, indices):
    """One 32-bit seed per image of this epoch (torch.manual_seed keeps only the low 32 bits of what it gets, so
    the mixing happens here: a sum like seed * K + epoch scaled by 2**31 would repeat every other epoch)."""
    with np.errstate(over="ignore"):  # uint64 arithmetic wraps, as intended
        key = _mix64(_mix64(np.array([seed % 2**64], dtype=np.uint64) + _GOLDEN) ^ np.uint64(epoch))
        return _mix64(key + np.asarray(indices, dtype=np.uint64) * _GOLDEN) >> np.uint64(32)


class _FolderViews(torch.utils.data.Dataset):
    """ImageFolder item -> (uint8 (n_views, 3, S, S) crops, label, index); colour happens later on the device."""

    def __init__(self, folder, transform, n_views):
        self.folder, self.transform, self.n_views = folder, transform, n_views

    def __len__(self):
        return len(self.folder.samples)

    def __getitem__(self, item):
        i, seed = item  # the image, and the seed of its crops this epoch (_ListSampler)
        path, label = self.folder.samples[i]
        try:
            image = self.folder.loader(path)  # PIL, converted to RGB
        except (OSError, ValueError) as e:
            raise DataError(f"cannot read image {path}: {e}") from None
        with torch.random.fork_rng(devices=[]):  # torchvision draws from the global CPU generator; leave it as it was
            torch.default_generator.manual_seed(seed)  # not torch.manual_seed: it would reseed the GPUs too
            return torch.stack([self.transform(image) for _ in range(self.n_views)]), label, i


class _ListSampler(torch.utils.data.Sampler):
    """Yields whatever (index, seed) list it currently holds; ViewLoader refills it every epoch."""

    def __init__(self):
        self.indices = []

    def __iter__(self):
        return iter(self.indices)

    def __len__(self):
        return len(self.indices)


class ViewLoader:
    """Batches (idx, views, labels) of one split; batch_size is per rank. See the module docstring."""

    def __init__(self, data: ImageSet, batch_size: int, views: str, n_views: int, img_size: int, device,
                 rank: int = 0, world_size: int = 1, seed: int = 0, shuffle: bool = True, drop_last: bool = True,
                 num_workers: int = 4, crop_scale: tuple[float, float] | None = None):
        if views not in VIEWS:
            raise DataError(f"unknown views {views!r}; choose one of {', '.join(VIEWS)}")
        self.data, self.batch_size, self.views, self.n_views = data, batch_size, views, n_views
        self.crop_scale = crop_scale or CROP_SCALE.get(views)
        self.img_size, self.device = img_size, torch.device(device)
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.shuffle, self.drop_last = shuffle, drop_last
        self.epoch, self.start_batch = 0, 0
        self.mean = torch.tensor(data.mean, device=self.device).view(1, -1, 1, 1)  # made once: no copies per step
        self.std = torch.tensor(data.std, device=self.device).view(1, -1, 1, 1)
        if data.images is not None:  # the whole uint8 set on the device, once (GPU-resident on CUDA)
            self.images, self.labels = data.images.to(self.device), data.labels.to(self.device)
            return
        from torchvision import transforms as T
        bicubic = T.InterpolationMode.BICUBIC
        if views == "eval":  # small images whole, as held in memory (_read_square); else the usual 224 of 256
            tf = [T.Resize(img_size if img_size <= SMALL_IMAGE else int(img_size / 0.875), interpolation=bicubic),
                  T.CenterCrop(img_size)]
        else:
            tf = [T.RandomResizedCrop(img_size, scale=self.crop_scale, ratio=CROP_RATIO, interpolation=bicubic),
                  T.RandomHorizontalFlip()]
        self.sampler = _ListSampler()
        self.loader = torch.utils.data.DataLoader(
            _FolderViews(data.folder, T.Compose(tf + [T.PILToTensor()]), n_views),  # uint8: 4x less to copy
            batch_size=batch_size, sampler=self.sampler, num_workers=num_workers,
            pin_memory=self.device.type == "cuda", persistent_workers=num_workers > 0,
            prefetch_factor=4 if num_workers > 0 else None)

    def _indices(self):
        return _shard_indices(len(self.data), self.batch_size, self.world_size, self.rank, self.seed, self.epoch,
                              self.shuffle, self.drop_last)

    def __len__(self):
        """Batches per full epoch on this rank (without drop_last, ranks may differ by one batch)."""
        return math.ceil(len(self._indices()) / self.batch_size)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Pick the epoch's permutation; skip the first start_batch batches of the next pass (resume mid-epoch)."""
        self.epoch, self.start_batch = epoch, start_batch

    def __iter__(self):
        indices = self._indices()[self.start_batch * self.batch_size:]
        self.start_batch = 0  # the skip applies to one pass only
        if self.data.images is None:
            yield from self._iter_files(indices)
            return
        indices = indices.to(self.device)
        for b in range(0, len(indices), self.batch_size):
            idx = indices[b:b + self.batch_size]  # (B,)
            views = augment(self.images[idx], self.views, self.n_views, self.img_size, self.mean, self.std,
                            self.crop_scale)
            yield idx, views, self.labels[idx]

    def _iter_files(self, indices):
        # Each image's crops are drawn from a seed of (seed, epoch, image), not from the workers' own generators:
        # the same crops whatever --num_workers, and a resumed epoch continues with the crops it would have had.
        self.sampler.indices = list(zip(indices.tolist(), _crop_seeds(self.seed, self.epoch, indices).tolist()))
        for crops, labels, idx in self.loader:  # crops: uint8 (B, n_views, 3, S, S)
            crops = crops.to(self.device, non_blocking=True).float() / 255
            views = []
            for i in range(self.n_views):
                v = crops[:, i]
                if self.views == "aug":
                    v = color_augment(v, i % 2)
                views.append(_normalize(v, self.mean, self.std))
            yield idx.to(self.device, non_blocking=True), views, labels.to(self.device, non_blocking=True)
