"""Few-shot image data: file-list reader, torch image transforms, episode and batch samplers, and the
embedded generated multi-domain image set for offline runs.

File lists follow the format of the few-shot code bases (Chen et al. 2019; Tseng et al. 2020): one
JSON per domain and split, ``<data-root>/<domain>/{base,val,novel}.json``, holding

    {"label_names": [str, ...], "image_names": [path, ...], "image_labels": [int, ...]}

Relative image paths are resolved against the JSON file's folder. Images are read with Pillow;
resizing, cropping, flipping and colour jitter are done in torch.
"""
from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from common.runtime import DataError

DOMAINS = ("miniImagenet", "cub", "cars", "places", "plantae")
SPLITS = ("base", "val", "novel")
IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
JITTER_STRENGTH = 0.4   # brightness, contrast and saturation factors drawn from [0.6, 1.4]
JITTER_ORDERS = ("fixed", "random")
# Classes with fewer images than an episode row needs: "pad" repeats the class's images cyclically
# (the authors' SubDataset), "drop" leaves the class out (no image twice in an episode).
SMALL_CLASSES = ("pad", "drop")
AUTHORS_MIN_CLASS_SIZE = 50  # the authors' SubDataset default (single-domain episode loaders)
BATCH_SAMPLING = ("epochs", "replacement")
TEST_RESIZE_FACTOR = 1.15  # test images: resize the short side to 1.15·size, then centre-crop
EMBEDDED_VERSION = 2
EMBEDDED_JPEG_QUALITY = 95


@dataclass
class FileList:
    """One domain split: resolved image paths, integer labels, and image indices per label."""

    path: Path
    label_names: list[str]
    image_paths: list[Path]
    labels: list[int]

    def indices_by_class(self) -> dict[int, list[int]]:
        """{label: [image index, ...]} for every label that has images."""
        groups: dict[int, list[int]] = {}
        for i, label in enumerate(self.labels):
            groups.setdefault(label, []).append(i)
        return groups


def read_file_list(path: str | Path, check_images: bool = True) -> FileList:
    """Read and validate a few-shot file-list JSON.

    Raises:
        DataError: if the file is missing or malformed, labels and names disagree, or (with
            ``check_images``) image files are missing.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"file list {path} not found: expected <data-root>/<domain>/<split>.json with keys "
                        "label_names, image_names, image_labels (see cross_domain_fewshot/README.md)")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise DataError(f"file list {path} is not UTF-8 text (byte at offset {err.start}); "
                        "file lists are UTF-8 JSON") from None
    except (OSError, json.JSONDecodeError) as err:
        raise DataError(f"file list {path} is not valid JSON ({err})") from None
    missing = [k for k in ("label_names", "image_names", "image_labels") if not isinstance(raw, dict) or k not in raw]
    if missing:
        raise DataError(f"file list {path} lacks {missing}")
    for key, kind, what in (("label_names", str, "strings"), ("image_names", str, "strings (image paths)"),
                            ("image_labels", int, "integers")):
        value = raw[key]
        wrong = ([value] if not isinstance(value, list)
                 else [x for x in value if not isinstance(x, kind) or isinstance(x, bool)])
        if wrong:
            raise DataError(f"file list {path}: {key} must be a list of {what}, found {wrong[0]!r}")
    names, labels = raw["image_names"], raw["image_labels"]
    if len(names) != len(labels) or not names:
        raise DataError(f"file list {path}: {len(names)} image_names but {len(labels)} image_labels")
    n_labels = len(raw["label_names"])
    bad = [x for x in labels if not 0 <= x < n_labels]
    if bad:
        raise DataError(f"file list {path}: image_labels must be integers in [0, {n_labels}), got {bad[:3]}")
    image_paths = [(path.parent / n) for n in names]
    if check_images:
        absent = [str(p) for p in image_paths if not p.is_file()]
        if absent:
            raise DataError(f"file list {path}: {len(absent)} image files missing, e.g. {absent[0]}")
    return FileList(path, list(raw["label_names"]), image_paths, [int(x) for x in labels])


def domain_file_list(data_root: str | Path, domain: str, split: str) -> FileList:
    """``read_file_list(<data_root>/<domain>/<split>.json)`` with a check of the names."""
    if domain not in DOMAINS or split not in SPLITS:
        raise DataError(f"unknown domain/split {domain}/{split}; domains {DOMAINS}, splits {SPLITS}")
    return read_file_list(Path(data_root) / domain / f"{split}.json")


def load_image(path: Path) -> Tensor:
    """RGB image as a uint8 tensor [3, H, W]."""
    try:
        with Image.open(path) as img:
            array = np.asarray(img.convert("RGB"), dtype=np.uint8)
    except (OSError, ValueError) as err:
        raise DataError(f"cannot read image {path} ({err})") from None
    return torch.from_numpy(array.copy()).permute(2, 0, 1)


def _resize(img: Tensor, height: int, width: int) -> Tensor:
    return F.interpolate(img.unsqueeze(0), size=(height, width), mode="bilinear", align_corners=False,
                         antialias=True).squeeze(0)


def _uniform(generator: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * torch.rand((), generator=generator).item()


def _gray(img: Tensor) -> Tensor:
    return (0.299 * img[0] + 0.587 * img[1] + 0.114 * img[2]).unsqueeze(0)


class ImageTransform:
    """uint8 [3, H, W] -> normalised float [3, size, size].

    Training (``augment``): random resized crop (scale 0.08-1, aspect 3/4-4/3), colour jitter
    (brightness, contrast, saturation, each factor from [0.6, 1.4]), horizontal flip. Test: resize
    to 1.15·size, centre crop. Both normalise with the ImageNet mean and std.

    ``jitter_order``: "fixed" applies brightness, contrast, saturation in that order (the authors'
    ``ImageJitter``: PIL's Brightness, Contrast, Color); "random" shuffles the order per image.
    """

    def __init__(self, size: int, augment: bool, jitter_order: str = "fixed") -> None:
        if jitter_order not in JITTER_ORDERS:
            raise ValueError(f"unknown jitter order {jitter_order!r}; choose from {JITTER_ORDERS}")
        self.size = size
        self.augment = augment
        self.jitter_order = jitter_order

    def __call__(self, image: Tensor, generator: torch.Generator) -> Tensor:
        img = image.float().div_(255)
        if self.augment:
            img = self._random_resized_crop(img, generator)
            img = self._jitter(img, generator)
            if torch.rand((), generator=generator).item() < 0.5:
                img = img.flip(-1)
        else:
            side = int(self.size * TEST_RESIZE_FACTOR)
            img = _resize(img, side, side)
            top = (side - self.size) // 2
            img = img[:, top:top + self.size, top:top + self.size]
        return (img.clamp_(0, 1) - IMAGENET_MEAN) / IMAGENET_STD

    def _random_resized_crop(self, img: Tensor, generator: torch.Generator) -> Tensor:
        height, width = img.shape[1:]
        for _ in range(10):
            area = height * width * _uniform(generator, 0.08, 1.0)
            aspect = math.exp(_uniform(generator, math.log(3 / 4), math.log(4 / 3)))
            w, h = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
            if 0 < w <= width and 0 < h <= height:
                top = int(torch.randint(0, height - h + 1, (), generator=generator))
                left = int(torch.randint(0, width - w + 1, (), generator=generator))
                return _resize(img[:, top:top + h, left:left + w], self.size, self.size)
        return _resize(img, self.size, self.size)

    def _jitter(self, img: Tensor, generator: torch.Generator) -> Tensor:
        ops = [0, 1, 2] if self.jitter_order == "fixed" else torch.randperm(3, generator=generator).tolist()
        for op in ops:
            factor = _uniform(generator, 1 - JITTER_STRENGTH, 1 + JITTER_STRENGTH)
            if op == 0:    # brightness: blend with black
                img = img * factor
            elif op == 1:  # contrast: blend with the mean grey level
                img = _gray(img).mean() + factor * (img - _gray(img).mean())
            else:          # saturation: blend with the grey image
                img = _gray(img) + factor * (img - _gray(img))
            img = img.clamp(0, 1)
        return img


class ImageSource:
    """Reads (and optionally caches) the decoded images of one file list and applies a transform."""

    def __init__(self, file_list: FileList, transform: ImageTransform, cache: bool = False) -> None:
        self.file_list = file_list
        self.transform = transform
        self.cache: dict[int, Tensor] | None = {} if cache else None

    def image(self, index: int, generator: torch.Generator) -> Tensor:
        if self.cache is None:
            return self.transform(load_image(self.file_list.image_paths[index]), generator)
        if index not in self.cache:
            self.cache[index] = load_image(self.file_list.image_paths[index])
        return self.transform(self.cache[index], generator)


@dataclass
class Episode:
    """images [n_way, n_shot + n_query, 3, S, S] (support first per row); classes [n_way]; indices [n_way, n_shot + n_query]."""

    images: Tensor
    classes: list[int]
    indices: list[list[int]]


def episode_classes(file_list: FileList, n_way: int, n_shot: int, n_query: int,
                    pad_to: int | None = None) -> dict[int, list[int]]:
    """{label: image indices} of the classes an episode can draw from.

    ``pad_to`` None: the classes with at least ``n_shot + n_query`` images, as they are. An int
    (the authors' ``SubDataset(min_size=...)``): every class with images; a class with fewer than
    ``max(pad_to, n_shot + n_query)`` images has its list repeated cyclically up to that length,
    so an episode row may hold one image more than once.

    Raises:
        DataError: if fewer than ``n_way`` classes qualify (no episode can be drawn).
    """
    per_class = n_shot + n_query
    if pad_to is not None:
        size = max(pad_to, per_class)
        groups = {c: [idx[i % len(idx)] for i in range(size)] if len(idx) < size else idx
                  for c, idx in file_list.indices_by_class().items()}
        if len(groups) < n_way:
            raise DataError(f"{file_list.path}: only {len(groups)} classes have images; {n_way}-way episodes "
                            f"need {n_way} (classes with fewer than {per_class} images are padded by repetition)")
        return groups
    groups = {c: idx for c, idx in file_list.indices_by_class().items() if len(idx) >= per_class}
    if len(groups) < n_way:
        raise DataError(f"{file_list.path}: only {len(groups)} classes have >= {per_class} images "
                        f"(--n-shot {n_shot} + --n-query {n_query}); {n_way}-way episodes need {n_way}")
    return groups


class EpisodeSampler:
    """n-way k-shot episodes with ``n_query`` queries per class from one file list.

    A row is a sample without replacement from the class's (possibly padded, see
    ``episode_classes``) image list, as the authors' per-class shuffled loaders give.
    """

    def __init__(self, source: ImageSource, n_way: int, n_shot: int, n_query: int, pad_to: int | None = None) -> None:
        self.source, self.n_way, self.n_shot, self.n_query = source, n_way, n_shot, n_query
        self.groups = episode_classes(source.file_list, n_way, n_shot, n_query, pad_to)

    def sample(self, generator: torch.Generator) -> Episode:
        labels = sorted(self.groups)
        chosen = [labels[i] for i in torch.randperm(len(labels), generator=generator)[: self.n_way].tolist()]
        indices = []
        for c in chosen:
            pool = self.groups[c]
            picks = torch.randperm(len(pool), generator=generator)[: self.n_shot + self.n_query].tolist()
            indices.append([pool[i] for i in picks])
        images = torch.stack([torch.stack([self.source.image(i, generator) for i in row]) for row in indices])
        return Episode(images, chosen, indices)


def balanced_domain_order(n_domains: int, n_episodes: int, generator: torch.Generator) -> list[int]:
    """The domain of each of ``n_episodes`` episodes: every domain ``n_episodes // n_domains`` times
    (the first ones once more for the remainder), in random order (the authors'
    ``MultiEpisodicBatchSampler``)."""
    order = [i % n_domains for i in range(n_episodes)]
    return [order[i] for i in torch.randperm(n_episodes, generator=generator).tolist()]


class BatchSampler:
    """Labelled batches (images [B, 3, S, S], labels [B]) from one file list.

    "epochs" (the authors' shuffled ``DataLoader``): passes over a fresh permutation of the list,
    ``batch_size`` images at a time, the last batch of a pass the remainder (dropped if it has fewer
    than ``min_batch`` images, e.g. fewer than the processes that share it); ``sample`` continues
    the current pass and starts the next one when it is used up, ``epoch`` gives one whole pass.
    "replacement": every batch ``batch_size`` independent uniform draws.
    """

    def __init__(self, source: ImageSource, batch_size: int, sampling: str = "epochs", min_batch: int = 1) -> None:
        if sampling not in BATCH_SAMPLING:
            raise ValueError(f"unknown batch sampling {sampling!r}; choose from {BATCH_SAMPLING}")
        self.source, self.batch_size, self.sampling, self.min_batch = source, batch_size, sampling, min_batch
        self.pending: list[list[int]] = []  # the batches left in the current pass ("epochs")

    def _pass(self, generator: torch.Generator) -> list[list[int]]:
        order = torch.randperm(len(self.source.file_list.labels), generator=generator).tolist()
        batches = [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        return [b for b in batches if len(b) >= self.min_batch]

    def load(self, picks: list[int], generator: torch.Generator) -> tuple[Tensor, Tensor]:
        images = torch.stack([self.source.image(i, generator) for i in picks])
        return images, torch.tensor([self.source.file_list.labels[i] for i in picks])

    def epoch(self, generator: torch.Generator):
        """One pass over the list in batches (an iterator of (images, labels)); "replacement": as many
        batches of independent draws as a pass has."""
        if self.sampling == "replacement":
            n = math.ceil(len(self.source.file_list.labels) / self.batch_size)
            return (self.sample(generator) for _ in range(n))
        return (self.load(picks, generator) for picks in self._pass(generator))

    def sample(self, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        if self.sampling == "replacement":
            n = len(self.source.file_list.labels)
            return self.load(torch.randint(0, n, (self.batch_size,), generator=generator).tolist(), generator)
        if not self.pending:
            self.pending = self._pass(generator)
        return self.load(self.pending.pop(0), generator)

    def state_dict(self) -> dict:
        return {"pending": [list(b) for b in self.pending]}

    def load_state_dict(self, state: dict) -> None:
        self.pending = [list(b) for b in state.get("pending", [])]


# ---------------------------------------------------------------------------------------------
# embedded generated image set
# ---------------------------------------------------------------------------------------------

# Per-domain style: hue range of the palette (fractions of the colour wheel), saturation,
# stripe frequency range (cycles per image), edge hardness of the stripes, pixel-noise std, and
# how strongly the class blob stands out. The domains differ in colour, texture and noise.
DOMAIN_STYLES = {
    "miniImagenet": dict(hue=(0.0, 1.0), saturation=0.6, freq=(1.5, 4.0), hard=0.0, noise=0.06, blob=0.7),
    "cub": dict(hue=(0.0, 0.16), saturation=0.8, freq=(1.0, 2.5), hard=0.0, noise=0.04, blob=0.9),
    "cars": dict(hue=(0.5, 0.7), saturation=0.15, freq=(4.0, 7.0), hard=1.0, noise=0.03, blob=0.5),
    "places": dict(hue=(0.45, 0.65), saturation=0.5, freq=(0.5, 1.5), hard=0.0, noise=0.08, blob=0.4),
    "plantae": dict(hue=(0.22, 0.4), saturation=0.7, freq=(2.0, 5.0), hard=0.5, noise=0.1, blob=0.6),
}


def _hsv_to_rgb(h: Tensor, s: float, v: Tensor) -> Tensor:
    """HSV (h in [0,1), scalar s, v) -> RGB [..., 3]."""
    k = torch.stack([(5 + h * 6) % 6, (3 + h * 6) % 6, (1 + h * 6) % 6], dim=-1)
    return v.unsqueeze(-1) * (1 - s * torch.clamp(torch.minimum(k, 4 - k), 0, 1))


def render_class_images(domain: str, class_seed: int, n_images: int, size: int) -> Tensor:
    """uint8 images [n_images, size, size, 3] of one generated class.

    A class is two colours from the domain's palette, an oriented stripe pattern and an ellipse
    blob; images jitter the stripe phase, orientation, blob position and brightness, plus noise.
    """
    style = DOMAIN_STYLES[domain]
    gen = torch.Generator().manual_seed(class_seed)
    rand = lambda *shape: torch.rand(shape, generator=gen)  # noqa: E731
    lo, hi = style["hue"]
    hues = lo + (hi - lo) * rand(2)
    colours = _hsv_to_rgb(hues, style["saturation"], torch.tensor([0.9, 0.35]))        # [2, 3]
    freq = style["freq"][0] + (style["freq"][1] - style["freq"][0]) * rand(1)
    angle = math.pi * rand(1)
    blob_centre, blob_radius = 0.25 + 0.5 * rand(2), 0.15 + 0.15 * rand(2)

    coords = torch.linspace(0, 1, size)
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")                                 # [S, S]
    theta = angle + 0.15 * (rand(n_images, 1, 1) - 0.5)
    phase = 2 * math.pi * rand(n_images, 1, 1)
    wave = torch.sin(2 * math.pi * freq * (xx * torch.cos(theta) + yy * torch.sin(theta)) + phase)
    wave = (1 - style["hard"]) * wave + style["hard"] * torch.sign(wave)
    mix = (0.5 + 0.5 * wave).unsqueeze(-1)                                                  # [N, S, S, 1]
    img = mix * colours[0] + (1 - mix) * colours[1]
    centre = blob_centre + 0.1 * (rand(n_images, 2) - 0.5)
    dist = (((xx - centre[:, 0, None, None]) / blob_radius[0]) ** 2
            + ((yy - centre[:, 1, None, None]) / blob_radius[1]) ** 2)
    blob = (dist < 1).float().unsqueeze(-1) * style["blob"]
    img = (1 - blob) * img + blob * colours[1].flip(0)
    img = img * (0.8 + 0.4 * rand(n_images, 1, 1, 1)) + style["noise"] * torch.randn(img.shape, generator=gen)
    return (img.clamp(0, 1) * 255).round().to(torch.uint8)


def write_embedded_dataset(root: str | Path, image_size: int = 40, classes_per_split: tuple[int, int, int] = (12, 5, 7),
                           images_per_class: int = 24, seed: int = 0) -> Path:
    """Write the generated image set in file-list format under ``root`` (idempotent).

    Five domains named like the real ones, each with base/val/novel splits of disjoint classes,
    JPEG images (as in the real sets; not PNG, which ``common.report`` would list as figures) and
    ``<domain>/<split>.json`` lists, generated deterministically from ``seed``. A stamp file
    records the settings; an existing set with the same stamp is reused, one with another stamp
    is replaced.

    Returns:
        ``root`` as a Path.
    """
    root = Path(root)
    stamp = {"version": EMBEDDED_VERSION, "image_size": image_size, "classes_per_split": list(classes_per_split),
             "images_per_class": images_per_class, "seed": seed}
    stamp_path = root / "embedded_stamp.json"
    if stamp_path.is_file():
        if json.loads(stamp_path.read_text()) == stamp:
            return root
        for domain in DOMAINS:  # an older generated set: replace it, leave nothing else behind
            shutil.rmtree(root / domain, ignore_errors=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: thread start-up costs more than it saves on a busy machine
    try:
        _write_domains(root, image_size, classes_per_split, images_per_class, seed)
    finally:
        torch.set_num_threads(threads)
    stamp_path.write_text(json.dumps(stamp))
    return root


def _write_domains(root: Path, image_size: int, classes_per_split: tuple[int, int, int], images_per_class: int,
                   seed: int) -> None:
    for d, domain in enumerate(DOMAINS):
        for s, (split, n_classes) in enumerate(zip(SPLITS, classes_per_split)):
            folder = root / domain / split
            folder.mkdir(parents=True, exist_ok=True)
            names, labels = [], []
            for c in range(n_classes):
                class_seed = seed * 1_000_003 + d * 10_007 + s * 101 + c
                images = render_class_images(domain, class_seed, images_per_class, image_size)
                for i, array in enumerate(images.numpy()):
                    name = f"{split}/c{c:02d}_{i:03d}.jpg"
                    Image.fromarray(array).save(root / domain / name, quality=EMBEDDED_JPEG_QUALITY)
                    names.append(name)
                    labels.append(c)
            listing = {"label_names": [f"{domain}_{split}_{c}" for c in range(n_classes)],
                       "image_names": names, "image_labels": labels}
            (root / domain / f"{split}.json").write_text(json.dumps(listing))
