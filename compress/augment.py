"""Training augmentation of whole batches: random crop and flip, and RandAugment, image by image in effect.

Every random number of a training epoch (shuffle, crop offsets, flips, RandAugment's ops and signs)
is drawn at its start on the CPU (``draw_epoch``), so batches do not depend on the device, and
reaches the device in one asynchronous copy (``Draws.to``): no batch waits on a host-to-device copy
or asks the device anything.

RandAugment (``BatchRandAugment``) is torchvision's ``v2.RandAugment()`` with each image drawing its
own two ops, as image-by-image use would; the images of a batch that drew the same op are sorted next
to each other on the CPU side, so each op runs once per batch on a slice, through torchvision's own
functions, on uint8 images as torchvision intends (float images in [0, 1] are accepted as well).
``compress.data.BatchLoader`` runs it on the device, ``compress.stream`` in its DataLoader workers.
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass

import torch


def default_crop_pad(height: int) -> int:
    """Padding of the random crop for images ``height`` pixels high: an eighth of the side, at least 1.

    32-pixel CIFAR images pad 4 (the usual recipe), 8-pixel digits pad 1, 224-pixel images pad 28.
    """
    return max(1, round(height / 8))


def draw_crop_flip(n: int, pad: int, generator: torch.Generator) -> torch.Tensor:
    """Crop offsets and flips of ``n`` images as one int64 (3, n) CPU tensor: rows dy, dx in [0, 2 * pad], flip 0/1."""
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    flip = (torch.rand(n, generator=generator) < 0.5).long()
    return torch.stack([dy, dx, flip])


def crop_flip(x: torch.Tensor, draws: torch.Tensor, pad: int) -> torch.Tensor:
    """``pad``-pixel translation (zero fill) and horizontal flip of a (N, C, H, W) batch, per image, as one gather.

    ``draws`` is ``draw_crop_flip``'s (3, N) tensor, already on ``x``'s device.
    """
    n, c, h, w = x.shape
    dy, dx, flip = draws
    xp = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    rows = (dy[:, None] + torch.arange(h, device=x.device))[:, :, None]      # (n, h, 1)
    cols = dx[:, None] + torch.arange(w, device=x.device)                    # (n, w)
    cols = torch.where(flip[:, None].bool(), cols.flip(1), cols)[:, None, :]  # (n, 1, w)
    idx = torch.arange(n, device=x.device)[:, None, None]
    return xp.permute(0, 2, 3, 1)[idx, rows, cols].permute(0, 3, 1, 2)


def random_crop_flip(x: torch.Tensor, pad: int, generator: torch.Generator) -> torch.Tensor:
    """``crop_flip`` with offsets drawn on the CPU from ``generator`` (so results do not depend on the device)."""
    return crop_flip(x, draw_crop_flip(len(x), pad, generator).to(x.device), pad)


# torchvision's RandAugment ops that move pixels (nearest interpolation, fill 0): each (op, sign) is the
# same gather for every image of a size, so it is computed once through torchvision and reused
MOVES = ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate")


def _remap(x: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """Pixel ``k`` of every output image is input pixel ``source[k] - 1`` (0: outside the image, filled with 0)."""
    flat = torch.nn.functional.pad(x.flatten(-2), (1, 0))  # column 0 is the fill
    return flat.index_select(-1, source).view_as(x)


def _sharpen(x: torch.Tensor, factor: float, kernel: torch.Tensor) -> torch.Tensor:
    """torchvision's ``adjust_sharpness_image`` with its 3x3 kernel made once (``kernel``, (C, 1, 3, 3)).

    torchvision builds the kernel from a Python list on every call: on CUDA that is a blocking
    host-to-device copy per batch. The arithmetic is its own, step for step, so uint8 results agree bit for bit.
    """
    if x.numel() == 0 or x.shape[-1] <= 2 or x.shape[-2] <= 2:
        return x
    fp = x.is_floating_point()
    out = x.to(kernel.dtype, copy=True)
    blurred = torch.nn.functional.conv2d(out, kernel, groups=x.shape[-3])
    if not fp:
        blurred = blurred.round_()
    inner = out[..., 1:-1, 1:-1]
    inner.add_(blurred.sub_(inner), alpha=1.0 - factor)
    out = out.clamp_(0, 1.0 if fp else 255)
    return out if fp else out.to(x.dtype)


@dataclass(frozen=True)
class _Prepared:
    """What ``BatchRandAugment`` needs on a device for one image shape and dtype."""

    magnitudes: tuple[float, ...]     # per variant, signed, as torchvision computes it for this size
    maps: dict[int, torch.Tensor]     # variant of a MOVES op -> source pixel + 1 of each pixel, (H * W,) int64
    kernel: torch.Tensor              # Sharpness's (C, 1, 3, 3) kernel


class BatchRandAugment:
    """torchvision's ``v2.RandAugment`` (default: 2 ops, magnitude 9 of 31 bins, fill 0) on whole batches.

    Each image gets its own ops and signs, as with ``v2.RandAugment`` applied image by image; given a
    batch, torchvision would draw one op for all of it, so the drawing is done here (``draw``) and
    each op runs once on the group of images that drew it (``apply``). The op list, the magnitudes and
    the op itself are torchvision's (``RandAugment._AUGMENTATION_SPACE`` and
    ``_apply_image_or_video_transform``), except two that torchvision would feed from the host on
    every call: the pixel moves (``MOVES``) become a gather with a map computed once per image size
    through torchvision's op, and Sharpness keeps its kernel (``_sharpen``). tests/test_data.py checks
    every (op, sign) against torchvision's RandAugment image by image.

    A variant is ``2 * op + negative``: op is an index into ``ops``, negative is 1 when a signed op's
    magnitude is negated (probability 0.5; always 0 for unsigned ops).
    """

    def __init__(self, num_ops: int = 2, magnitude: int = 9, num_magnitude_bins: int = 31) -> None:
        from torchvision.transforms import v2

        self._tv = v2.RandAugment(num_ops=num_ops, magnitude=magnitude, num_magnitude_bins=num_magnitude_bins)
        self.ops: tuple[str, ...] = tuple(self._tv._AUGMENTATION_SPACE)
        self.signed = torch.tensor([signed for _, signed in self._tv._AUGMENTATION_SPACE.values()])
        self.num_ops = num_ops
        self._prepared: dict[tuple, _Prepared] = {}

    @property
    def num_variants(self) -> int:
        return 2 * len(self.ops)

    def draw(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """Variants of ``n`` images, int64 (num_ops, n): row r is every image's r-th op."""
        op = torch.randint(0, len(self.ops), (self.num_ops, n), generator=generator)
        negative = (torch.rand(self.num_ops, n, generator=generator) < 0.5) & self.signed[op]
        return 2 * op + negative

    def magnitude(self, variant: int, height: int, width: int) -> float:
        """The signed magnitude torchvision gives a variant's op on ``height`` x ``width`` images (0.0: none)."""
        name = self.ops[variant // 2]
        bins = self._tv._AUGMENTATION_SPACE[name][0](self._tv.num_magnitude_bins, height, width)
        return 0.0 if bins is None else float(bins[self._tv.magnitude]) * (-1 if variant % 2 else 1)

    def _torchvision(self, x: torch.Tensor, variant: int, magnitude: float) -> torch.Tensor:
        return self._tv._apply_image_or_video_transform(x, self.ops[variant // 2], magnitude,
                                                        interpolation=self._tv.interpolation, fill=self._tv._fill)

    def prepare(self, shape: torch.Size | tuple[int, ...], dtype: torch.dtype, device: torch.device) -> _Prepared:
        """Magnitudes, pixel maps and kernel for (C, H, W) images of ``dtype`` on ``device``, made once.

        ``BatchLoader`` calls it when it is built, so no epoch copies them to the device. A map is
        computed on the CPU by moving an image whose pixels hold their own index + 1 (float32: exact up
        to 2**24 pixels, and the grid torchvision uses for uint8 and float32 images alike).
        """
        c, h, w = shape[-3:]
        key = (c, h, w, dtype, device)
        if key not in self._prepared:
            if h * w >= 2**24:
                raise ValueError(f"RandAugment takes images of fewer than 2**24 pixels, got {h}x{w}")
            magnitudes = tuple(self.magnitude(v, h, w) for v in range(self.num_variants))
            index = torch.arange(1, h * w + 1, dtype=torch.float32).view(1, 1, h, w)
            maps = {v: self._torchvision(index, v, magnitudes[v]).view(-1).long().to(device)
                    for v in range(self.num_variants) if self.ops[v // 2] in MOVES}
            a, b = 1.0 / 13.0, 5.0 / 13.0  # torchvision's normalised kernel: 1s around a 5
            kernel = torch.tensor([[a, a, a], [a, b, a], [a, a, a]], dtype=dtype if dtype.is_floating_point
                                  else torch.float32).expand(c, 1, 3, 3).to(device)
            self._prepared[key] = _Prepared(magnitudes, maps, kernel)
        return self._prepared[key]

    def apply(self, x: torch.Tensor, variant: int) -> torch.Tensor:
        """One variant on a whole (N, C, H, W) batch, uint8 or float in [0, 1]."""
        name = self.ops[variant // 2]
        if name == "Identity":
            return x
        p = self.prepare(x.shape, x.dtype, x.device)
        if name in MOVES:
            return _remap(x, p.maps[variant])
        if name == "Sharpness":
            return _sharpen(x, 1.0 + p.magnitudes[variant], p.kernel)
        return self._torchvision(x, variant, p.magnitudes[variant])

    def apply_groups(self, x: torch.Tensor, groups: list[tuple[int, int, int]]) -> torch.Tensor:
        """Each (variant, start, stop) of ``groups`` applied to ``x[start:stop]``; the groups tile the batch."""
        return torch.cat([self.apply(x[start:stop], v) for v, start, stop in groups])


@dataclass(frozen=True)
class Draws:
    """Every random number of an epoch's augmentation, drawn once on the CPU; ``to`` moves them in one copy.

    Tensors are indexed by slot, the position in the epoch (batch b holds slots ``b * batch_size``
    onwards). With RandAugment, each batch's slots are sorted by the images' first variant, so the
    images sharing one are a slice (``groups[b][0]``, bounds known on the CPU without asking the
    device); before round r > 0 the batch is gathered by ``regroup[r - 1]`` to sort it by the r-th
    variant. Order within a batch does not matter to training, and labels move with their images.
    """

    batch_size: int
    order: torch.Tensor                 # (n,) image index of each slot
    crop_pad: int
    crop: torch.Tensor | None           # (3, n) dy, dx, flip (draw_crop_flip); None: no crop
    randaugment: BatchRandAugment | None
    variants: torch.Tensor | None       # (num_ops, n) row r: variant of the image in slot j of round r's order
    regroup: torch.Tensor | None        # (num_ops - 1, n) batch-local gather before round r > 0
    groups: list[list[list[tuple[int, int, int]]]] | None  # [batch][round] -> (variant, start, stop)

    def to(self, device: torch.device) -> Draws:
        """The draws on ``device``: order, crop and regroup packed in one int64 tensor, so one copy.

        On CUDA the copy is from pinned memory and asynchronous: the host never waits for the device.
        """
        parts = [self.order[None]] + [t for t in (self.crop, self.regroup) if t is not None]
        packed = torch.cat(parts)
        if device.type == "cuda":
            packed = packed.pin_memory()
        packed = packed.to(device, non_blocking=device.type == "cuda")
        crop = packed[1:4] if self.crop is not None else None
        regroup = packed[len(packed) - len(self.regroup):] if self.regroup is not None else None
        return dataclasses.replace(self, order=packed[0], crop=crop, regroup=regroup)

    def augment(self, batch: int, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch ``batch`` (images and labels gathered by its slots of ``order``) cropped, flipped, RandAugmented.

        Returns images and labels in the batch's final order.
        """
        slots = slice(batch * self.batch_size, (batch + 1) * self.batch_size)
        if self.crop is not None:
            x = crop_flip(x, self.crop[:, slots], self.crop_pad)
        if self.randaugment is not None:
            for r, groups in enumerate(self.groups[batch]):
                if r:
                    gather = self.regroup[r - 1, slots]
                    x, y = x[gather], y[gather]
                x = self.randaugment.apply_groups(x, groups)
        return x, y


def draw_epoch(n: int, batch_size: int, generator: torch.Generator, *, shuffle: bool, crop_pad: int,
               randaugment: BatchRandAugment | None) -> Draws:
    """All draws of an epoch of ``n`` images, in a fixed order from ``generator``: the shuffle, crop, RandAugment.

    E.g. 50,000 images, batch 128, RandAugment on: 391 batches of about 23 groups per round.
    """
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    crop = draw_crop_flip(n, crop_pad, generator) if crop_pad else None
    if randaugment is None:
        return Draws(batch_size, order, crop_pad, crop, None, None, None, None)
    variants = randaugment.draw(n, generator)
    num_variants = randaugment.num_variants
    batch = torch.arange(n) // batch_size
    num_batches = (n + batch_size - 1) // batch_size
    regroup, rounds = [], []
    for r in range(randaugment.num_ops):
        # batch is the major key, so the sort never moves an image out of its batch
        key = batch * num_variants + variants[r]
        perm = torch.argsort(key, stable=True)
        variants[r:] = variants[r:, perm]
        if r == 0:
            order = order[perm]
            crop = crop[:, perm] if crop is not None else None
        else:
            regroup.append(perm - batch * batch_size)
        # each run of one key is a group: (variant, start, stop), bounds counted within its batch
        keys, counts = torch.unique_consecutive(key[perm], return_counts=True)
        group_batch = keys // num_variants
        stop = counts.cumsum(0) - group_batch * batch_size
        first = torch.searchsorted(group_batch, torch.arange(num_batches + 1)).tolist()  # each batch's first group
        v, start, stop = (keys % num_variants).tolist(), (stop - counts).tolist(), stop.tolist()
        rounds.append([list(zip(v[i:j], start[i:j], stop[i:j], strict=True)) for i, j in itertools.pairwise(first)])
    groups = [list(per_batch) for per_batch in zip(*rounds, strict=True)]  # [round][batch] -> [batch][round]
    return Draws(batch_size, order, crop_pad, crop, randaugment, variants,
                 torch.stack(regroup) if regroup else None, groups)


def augment(x: torch.Tensor, crop_pad: int, randaugment: BatchRandAugment | None,
            generator: torch.Generator) -> torch.Tensor:
    """Training augmentation of one (N, C, H, W) batch, uint8 or float in [0, 1], drawn from ``generator``.

    The ``draw_epoch`` recipe for a single batch, images returned in their input order.
    ``compress.stream.Batches`` runs it in its workers; ``BatchLoader`` draws a whole epoch at once instead.
    """
    if not len(x):
        return x
    draws = draw_epoch(len(x), len(x), generator, shuffle=False, crop_pad=crop_pad,
                       randaugment=randaugment).to(x.device)
    out, position = draws.augment(0, x[draws.order], draws.order)
    return out[torch.argsort(position)]
