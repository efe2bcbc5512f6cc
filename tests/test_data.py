"""CIFAR-10 readers (binary and python layouts), subsets, batch augmentation and the batch loader."""

from __future__ import annotations

import functools
import hashlib
import pickle
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import stats
from torchvision.transforms import v2

from compress.augment import BatchRandAugment, Draws, augment, draw_epoch, random_crop_flip
from compress.data import BIN_DIR, PY_DIR, BatchLoader, DataError, load_cifar10, one_cpu_thread, subset_indices
from tests.conftest import TEST_IMAGES, TRAIN_PER_FILE, synthetic_records


def _hand_decode(path: Path, record: int) -> tuple[int, torch.Tensor]:
    """One record decoded byte by byte: label, then R, G, B planes of 32 rows of 32 pixels."""
    raw = path.read_bytes()
    base = record * 3073
    label = raw[base]
    img = torch.zeros(3, 32, 32, dtype=torch.uint8)
    for c in range(3):
        for y in range(32):
            for x in range(32):
                img[c, y, x] = raw[base + 1 + c * 1024 + y * 32 + x]
    return label, img


def test_binary_reader_matches_hand_decoded_records(synthetic_cifar: Path) -> None:
    data = load_cifar10(synthetic_cifar)
    assert data.train_x.shape == (5 * TRAIN_PER_FILE, 3, 32, 32) and data.train_x.dtype == torch.uint8
    assert data.test_x.shape == (TEST_IMAGES, 3, 32, 32)
    assert data.train_y.dtype == torch.int64
    folder = synthetic_cifar / BIN_DIR
    label, img = _hand_decode(folder / "data_batch_3.bin", 7)
    assert data.train_y[2 * TRAIN_PER_FILE + 7] == label
    assert torch.equal(data.train_x[2 * TRAIN_PER_FILE + 7], img)
    label, img = _hand_decode(folder / "test_batch.bin", TEST_IMAGES - 1)
    assert data.test_y[-1] == label
    assert torch.equal(data.test_x[-1], img)


def test_layout_folder_itself_is_a_valid_root(synthetic_cifar: Path) -> None:
    a, b = load_cifar10(synthetic_cifar), load_cifar10(synthetic_cifar / BIN_DIR)
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.test_y, b.test_y)


def test_root_from_environment(synthetic_cifar: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COMPRESS_DATA", str(synthetic_cifar))
    assert len(load_cifar10().test_y) == TEST_IMAGES


def test_missing_root_says_where_it_looked(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=f"not found under {tmp_path / 'nowhere'}.*{BIN_DIR}.*{PY_DIR}"):
        load_cifar10(tmp_path / "nowhere")
    with pytest.raises(DataError, match="COMPRESS_DATA"):
        load_cifar10(None)


def test_incomplete_or_damaged_binary_folder(synthetic_cifar: Path, tmp_path: Path) -> None:
    folder = tmp_path / BIN_DIR
    shutil.copytree(synthetic_cifar / BIN_DIR, folder)
    (folder / "test_batch.bin").unlink()
    with pytest.raises(DataError, match="test_batch.bin is missing"):
        load_cifar10(tmp_path)
    (folder / "data_batch_5.bin").write_bytes((folder / "data_batch_5.bin").read_bytes()[:-1])
    with pytest.raises(DataError, match="data_batch_5.bin: 153649 bytes is not a whole number of 3,073-byte"):
        load_cifar10(tmp_path)


# --- the python layout, through torchvision --------------------------------------------------------

def _write_py_layout(root: Path) -> dict[str, str]:
    """The pickles torchvision's CIFAR10 reads (same images as the synthetic binary set); name -> md5."""
    folder = root / PY_DIR
    folder.mkdir(parents=True)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for i, name in enumerate(names):
        images, labels = synthetic_records(TEST_IMAGES if name == "test_batch" else TRAIN_PER_FILE,
                                           seed=0 if name == "test_batch" else i + 1)
        entry = {"batch_label": name, "labels": labels.tolist(), "data": images.reshape(len(images), -1),
                 "filenames": [f"{name}_{j}.png" for j in range(len(images))]}
        (folder / name).write_bytes(pickle.dumps(entry))
    meta = {"label_names": [f"class{c}" for c in range(10)], "num_cases_per_batch": TRAIN_PER_FILE, "num_vis": 3072}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta))
    return {f.name: hashlib.md5(f.read_bytes()).hexdigest() for f in folder.iterdir()}


def test_python_layout_reads_through_torchvision(synthetic_cifar: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """torchvision checks every pickle against the official md5s; point those at our files.

    Only the expected checksums change: torchvision's own integrity check, unpickling and
    HWC layout run as they do on the real download.
    """
    from torchvision.datasets import CIFAR10

    md5 = _write_py_layout(tmp_path)
    monkeypatch.setattr(CIFAR10, "train_list", [[f"data_batch_{i}", md5[f"data_batch_{i}"]] for i in range(1, 6)])
    monkeypatch.setattr(CIFAR10, "test_list", [["test_batch", md5["test_batch"]]])
    monkeypatch.setattr(CIFAR10, "meta", {**CIFAR10.meta, "md5": md5["batches.meta"]})
    py = load_cifar10(tmp_path)
    assert py.source.endswith(PY_DIR)
    binary = load_cifar10(synthetic_cifar)
    for a, b in [(py.train_x, binary.train_x), (py.train_y, binary.train_y),
                 (py.test_x, binary.test_x), (py.test_y, binary.test_y)]:
        assert a.dtype == b.dtype and torch.equal(a, b)
    assert torch.equal(load_cifar10(tmp_path / PY_DIR).test_x, binary.test_x)


def test_python_layout_failing_torchvision_integrity_is_a_data_error(tmp_path: Path) -> None:
    _write_py_layout(tmp_path)  # not the official bytes: torchvision's md5 check rejects them
    with pytest.raises(DataError, match=f"cannot read CIFAR-10 python version under {tmp_path}"):
        load_cifar10(tmp_path)


@pytest.fixture
def cifar_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """The synthetic python layout as a .tar.gz served over HTTP on this machine, with torchvision's
    download address and checksums pointed at it; yields the address."""
    import http.server
    import tarfile
    import threading

    from torchvision.datasets import CIFAR10

    served = tmp_path / "served"
    md5 = _write_py_layout(served / "src")
    archive = served / CIFAR10.filename
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(served / "src" / PY_DIR, arcname=PY_DIR)
    monkeypatch.setattr(CIFAR10, "train_list", [[f"data_batch_{i}", md5[f"data_batch_{i}"]] for i in range(1, 6)])
    monkeypatch.setattr(CIFAR10, "test_list", [["test_batch", md5["test_batch"]]])
    monkeypatch.setattr(CIFAR10, "meta", {**CIFAR10.meta, "md5": md5["batches.meta"]})
    monkeypatch.setattr(CIFAR10, "tgz_md5", hashlib.md5(archive.read_bytes()).hexdigest())
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/{CIFAR10.filename}"
    monkeypatch.setattr(CIFAR10, "url", url)
    yield url
    server.shutdown()


def test_download_fetches_and_verifies_the_archive(cifar_server: str, synthetic_cifar: Path, tmp_path: Path) -> None:
    """torchvision's downloader and checks, against an archive served here (nothing else is reachable)."""
    root = tmp_path / "fresh"
    with pytest.raises(DataError, match="add --download to fetch it into"):
        load_cifar10(root)
    got = load_cifar10(root, download=True)
    assert (root / PY_DIR / "test_batch").is_file() and torch.equal(got.test_x, load_cifar10(synthetic_cifar).test_x)
    assert torch.equal(load_cifar10(root).train_y, got.train_y)  # the next run reads it without --download


def test_download_of_a_damaged_archive_is_one_data_error(cifar_server: str, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from torchvision.datasets import CIFAR10

    monkeypatch.setattr(CIFAR10, "tgz_md5", "0" * 32)  # what a truncated or altered download looks like
    with pytest.raises(DataError, match="cannot read CIFAR-10 python version under"):
        load_cifar10(tmp_path / "fresh", download=True)


def test_prune_download_option_fetches_before_the_run(cifar_server: str, synthetic_weights: Path,
                                                      tmp_path: Path) -> None:
    from click.testing import CliRunner

    from cli.main import cli

    args = ["prune", "--data-root", str(tmp_path / "fresh"), "--weights", str(synthetic_weights), "--results",
            str(tmp_path / "results"), "--phases", "1", "--epochs", "0", "--final-sparsity", "0.5",
            "--eval-batch-size", "100"]
    missing = CliRunner().invoke(cli, args)
    assert missing.exit_code == 2 and "add --download" in missing.stderr and not (tmp_path / "results").exists()
    done = CliRunner().invoke(cli, [*args, "--download"])
    assert done.exit_code == 0, done.output
    assert (tmp_path / "fresh" / PY_DIR).is_dir() and "final: top-1" in done.stdout


# --- subsets -----------------------------------------------------------------------------------

def test_subset_indices_are_deterministic_nested_and_distinct() -> None:
    a = subset_indices(50_000, 5_000, seed=3)
    assert torch.equal(a, subset_indices(50_000, 5_000, seed=3))
    assert torch.equal(subset_indices(50_000, 1_000, seed=3), a[:1_000])
    assert not torch.equal(subset_indices(50_000, 1_000, seed=4), a[:1_000])
    assert len(set(a.tolist())) == 5_000 and int(a.min()) >= 0 and int(a.max()) < 50_000
    assert torch.equal(subset_indices(100, 7, seed=0, how="first"), torch.arange(7))
    assert sorted(subset_indices(10, 10, seed=1).tolist()) == list(range(10))


@pytest.mark.parametrize("size", [0, -1, 101])
def test_subset_size_out_of_bounds(size: int) -> None:
    with pytest.raises(ValueError, match=r"subset size must be in \[1, 100\]"):
        subset_indices(100, size, seed=0)


def test_subset_unknown_selection() -> None:
    with pytest.raises(ValueError, match="known: first, random"):
        subset_indices(100, 10, seed=0, how="last")


# --- augmentation ----------------------------------------------------------------------------------

def _crop_flip_one(img: torch.Tensor, dy: int, dx: int, flip: bool, pad: int) -> torch.Tensor:
    """One image: zero-pad, cut the H x W window at offset (dy, dx), mirror when ``flip``."""
    h, w = img.shape[-2:]
    img = F.pad(img, (pad, pad, pad, pad))[:, dy:dy + h, dx:dx + w]
    return img.flip(-1) if flip else img


def _crop_flip_reference(x: torch.Tensor, pad: int, generator: torch.Generator) -> torch.Tensor:
    """Per image, offsets and flips drawn in that order (dy for all, dx for all, flip for all)."""
    n = len(x)
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    flip = torch.rand(n, generator=generator) < 0.5
    return torch.stack([_crop_flip_one(x[i], int(dy[i]), int(dx[i]), bool(flip[i]), pad) for i in range(n)])


@pytest.mark.parametrize("pad", [1, 4])
def test_random_crop_flip_equals_per_image_reference(pad: int) -> None:
    x = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    got = random_crop_flip(x, pad, torch.Generator().manual_seed(11))
    ref = _crop_flip_reference(x, pad, torch.Generator().manual_seed(11))
    assert got.dtype == torch.uint8 and torch.equal(got, ref)
    assert not torch.equal(got, x)


def test_random_crop_flip_of_a_constant_image_fills_the_border_with_zeros() -> None:
    x = torch.full((200, 1, 32, 32), 7, dtype=torch.uint8)
    out = random_crop_flip(x, 4, torch.Generator().manual_seed(0))
    assert set(out.unique().tolist()) == {0, 7}
    assert int((out == 7).sum(dim=(1, 2, 3)).min()) >= 28 * 28  # at most 4 rows and 4 columns of padding


# --- the loader --------------------------------------------------------------------------------

def _batches(loader: BatchLoader) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x.clone(), y.clone()) for x, y in loader]


def _same(a: list, b: list) -> bool:
    if len(a) != len(b):
        return False
    return all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(a, b, strict=True))


@pytest.mark.parametrize("randaugment", [False, True])
def test_batch_loader_is_a_function_of_seed_and_epoch(synthetic_cifar: Path, device: torch.device,
                                                      randaugment: bool) -> None:
    data = load_cifar10(synthetic_cifar)
    x, y = data.train_x[:100], data.train_y[:100]

    def loader(seed: int, epoch: int) -> BatchLoader:
        ld = BatchLoader(x, y, 32, device, train=True, randaugment=randaugment, seed=seed)
        ld.set_epoch(epoch)
        return ld

    first = _batches(loader(1, 3))
    assert [len(b[1]) for b in first] == [32, 32, 32, 4]
    assert _same(first, _batches(loader(1, 3)))
    assert not _same(first, _batches(loader(1, 4)))
    assert not _same(first, _batches(loader(2, 3)))
    again = loader(1, 3)
    _batches(again)
    assert _same(first, _batches(again)), "a second pass over the same epoch differs"
    labels = torch.cat([b[1] for b in first]).cpu()
    assert sorted(labels.tolist()) == sorted(y.tolist())  # a permutation: every image once


def test_epoch_orders_do_not_collide_across_seeds_and_phases(synthetic_cifar: Path) -> None:
    """seed*100_003 + phase*10_000 + epoch gave (seed 0, phase 11, epoch 3) the order of (seed 1, phase 1, epoch 0)."""
    data = load_cifar10(synthetic_cifar)

    def order(seed: int, *key: int) -> list[int]:
        ld = BatchLoader(data.train_x, torch.arange(len(data.train_x)), 250, train=True, crop_pad=0, seed=seed)
        ld.set_epoch(*key)
        return next(iter(ld))[1].tolist()

    assert order(0, 11, 3) != order(1, 1, 0)
    assert order(0, 11, 3) == order(0, 11, 3)
    keys = [(s, p, e) for s in range(3) for p in range(13) for e in range(12)]
    distinct = set()
    for s, p, e in keys:
        ld = BatchLoader(data.train_x[:1], data.train_y[:1], 1, seed=s)
        ld.set_epoch(p, e)
        distinct.add(ld.epoch_seed())
    assert len(distinct) == len(keys)
    with pytest.raises(ValueError, match="non-negative"):
        BatchLoader(data.train_x[:1], data.train_y[:1], 1).set_epoch(-1)


def test_eval_loader_keeps_order_and_scales_to_unit_range(synthetic_cifar: Path, device: torch.device) -> None:
    data = load_cifar10(synthetic_cifar)
    batches = list(BatchLoader(data.test_x, data.test_y, 30, device))
    assert len(batches) == len(BatchLoader(data.test_x, data.test_y, 30)) == 4
    x = torch.cat([b[0] for b in batches]).cpu()
    assert x.dtype == torch.float32 and batches[0][0].is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(x, data.test_x.float() / 255)
    assert torch.equal(torch.cat([b[1] for b in batches]).cpu(), data.test_y)


def test_loader_rejects_mismatched_lengths() -> None:
    with pytest.raises(ValueError, match="10 images but 9 labels"):
        BatchLoader(torch.zeros(10, 3, 32, 32, dtype=torch.uint8), torch.zeros(9, dtype=torch.int64), 4)


def test_synthetic_set_has_every_class_with_its_own_colour(synthetic_cifar: Path) -> None:
    data = load_cifar10(synthetic_cifar)
    assert torch.bincount(data.train_y, minlength=10).tolist() == [25] * 10
    means = torch.stack([data.train_x[data.train_y == c].float().mean(dim=(0, 2, 3)) for c in range(10)])
    assert torch.cdist(means, means).add(torch.eye(10) * 1e3).min() > 50
    assert np.array_equal(data.test_y.numpy(), synthetic_records(TEST_IMAGES, seed=0)[1])


def test_batch_preparation_runs_on_one_thread_and_restores_the_count(synthetic_cifar: Path) -> None:
    data = load_cifar10(synthetic_cifar)
    saved = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with one_cpu_thread(torch.device("cpu")):
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
        seen = []
        loader = BatchLoader(data.train_x, data.train_y, 100, train=True, randaugment=False)
        for _ in loader:
            seen.append(torch.get_num_threads())  # the training step between batches keeps its threads
        assert seen == [2, 2, 2]
        with pytest.raises(RuntimeError), one_cpu_thread(torch.device("cpu")):
            raise RuntimeError
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(saved)


# --- batched RandAugment -------------------------------------------------------------------------

# every (op, negated) torchvision's RandAugment can draw: 14 ops, 9 of them signed
TV_SPACE = v2.RandAugment._AUGMENTATION_SPACE
VARIANTS = [(name, neg) for name, (_, signed) in TV_SPACE.items() for neg in ((False, True) if signed else (False,))]


def _torchvision_op(name: str, negative: bool) -> v2.RandAugment:
    """torchvision's own RandAugment with its draw forced: one op, ``name``, at its magnitude, negated when asked."""
    magnitudes, _ = TV_SPACE[name]
    ra = v2.RandAugment(num_ops=1)
    ra._AUGMENTATION_SPACE = {name: ((lambda *a: -magnitudes(*a)) if negative else magnitudes, False)}
    return ra


def _op_batches() -> list[torch.Tensor]:
    """uint8 CIFAR-sized noise with a constant and an all-zero image, a non-square uint8 batch, float greyscale."""
    g = torch.Generator().manual_seed(0)
    cifar = torch.randint(0, 256, (12, 3, 32, 32), dtype=torch.uint8, generator=g)
    cifar[0] = 77
    cifar[1] = 0
    cifar[2] = (torch.arange(32 * 32).view(1, 32, 32) // 5).to(torch.uint8)  # a gradient
    wide = torch.randint(0, 256, (5, 3, 20, 28), dtype=torch.uint8, generator=g)
    grey = torch.rand(6, 1, 8, 8, generator=g)
    return [cifar, wide, grey]


@pytest.mark.parametrize(("name", "negative"), VARIANTS, ids=[f"{n}{'-' if s else '+'}" for n, s in VARIANTS])
def test_each_randaugment_op_on_a_batch_equals_torchvision_image_by_image(name: str, negative: bool) -> None:
    """One call on the whole batch, against torchvision's RandAugment forced to that op, one image at a time."""
    ra = BatchRandAugment()
    variant = 2 * ra.ops.index(name) + negative
    ref_op = _torchvision_op(name, negative)
    for x in _op_batches():
        got = ra.apply(x, variant)
        ref = torch.stack([ref_op(img) for img in x])
        assert got.dtype == x.dtype and got.shape == x.shape
        if x.dtype == torch.uint8:
            assert torch.equal(got, ref), f"{name} {x.shape}: {int((got != ref).sum())} pixels differ"
        else:  # float: batched and single-image convolutions may round the last bit differently
            assert torch.allclose(got, ref, rtol=0, atol=1e-6)
    assert name == "Identity" or not torch.equal(ra.apply(_op_batches()[0], variant), _op_batches()[0])


def _reference_batch(x: torch.Tensor, y: torch.Tensor, draws: Draws, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch ``batch`` of ``draws`` made image by image: crop and flip, then each round's op through torchvision."""
    slots = range(batch * draws.batch_size, min((batch + 1) * draws.batch_size, len(draws.order)))
    images = [x[int(draws.order[j])] for j in slots]
    labels = [y[int(draws.order[j])] for j in slots]
    if draws.crop is not None:
        images = [_crop_flip_one(img, *draws.crop[:, j].tolist(), draws.crop_pad)
                  for img, j in zip(images, slots, strict=True)]
    ops = draws.randaugment.ops
    for r in range(draws.randaugment.num_ops):
        if r:
            gather = draws.regroup[r - 1, slots.start:slots.stop].tolist()
            images, labels = [images[k] for k in gather], [labels[k] for k in gather]
        variants = draws.variants[r, slots.start:slots.stop].tolist()
        images = [_torchvision_op(ops[v // 2], bool(v % 2))(img) for img, v in zip(images, variants, strict=True)]
    return torch.stack(images), torch.stack(labels)


def test_loader_batches_are_torchvision_randaugment_image_by_image_under_their_draws(synthetic_cifar: Path) -> None:
    """Every training batch equals crop + flip + two torchvision ops per image, as the epoch's draws say."""
    data = load_cifar10(synthetic_cifar)
    x, y = data.train_x[:70], data.train_y[:70]
    ld = BatchLoader(x, y, 32, train=True, randaugment=True, seed=5)
    ld.set_epoch(1, 2)
    draws = ld.epoch_draws()
    batches = _batches(ld)
    assert len(batches) == 3
    for b, (xb, yb) in enumerate(batches):
        ref_x, ref_y = _reference_batch(x, y, draws, b)
        assert torch.equal(yb, ref_y)
        assert torch.equal(xb, ref_x.float() / 255)


def test_augment_returns_the_images_in_their_input_order() -> None:
    """``augment`` (the streamed loader's per-batch recipe) regroups internally but hands back input order."""
    ra = BatchRandAugment()
    x = torch.randint(0, 256, (40, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    got = augment(x, 2, ra, torch.Generator().manual_seed(9))
    draws = draw_epoch(40, 40, torch.Generator().manual_seed(9), shuffle=False, crop_pad=2, randaugment=ra)
    ref, position = _reference_batch(x, torch.arange(40), draws, 0)
    assert torch.equal(got, ref[torch.argsort(position)])
    assert torch.equal(got, augment(x, 2, ra, torch.Generator().manual_seed(9)))
    assert not torch.equal(got, augment(x, 2, ra, torch.Generator().manual_seed(10)))
    floats = augment(x.float() / 255, 2, ra, torch.Generator().manual_seed(9))  # float in [0, 1] stays so
    assert floats.dtype == torch.float32 and floats.shape == x.shape
    assert 0 <= float(floats.min()) <= float(floats.max()) <= 1


def test_randaugment_draws_have_torchvisions_distribution() -> None:
    """Ops uniform over torchvision's 14 and independent across the two rounds; signed ops negated half the time."""
    tv = v2.RandAugment()
    ra = BatchRandAugment()
    assert (ra.num_ops, ra.ops) == (tv.num_ops, tuple(TV_SPACE)) and len(ra.ops) == 14
    assert [ra.magnitude(2 * ra.ops.index("Rotate") + s, 32, 32) for s in (0, 1)] == [9.0, -9.0]  # bin 9 of 0..30
    n = 30_000
    variants = ra.draw(n, torch.Generator().manual_seed(0))
    op, negative = variants // 2, (variants % 2).bool()
    assert stats.chisquare(torch.bincount(op.flatten(), minlength=14).numpy()).pvalue > 1e-3
    pairs = torch.bincount(op[0] * 14 + op[1], minlength=14 * 14).numpy()  # 153 a cell on average
    assert stats.chisquare(pairs).pvalue > 1e-3
    signed = torch.tensor([s for _, s in TV_SPACE.values()])[op]
    assert not negative[~signed].any()
    for r in range(2):
        k, m = int(negative[r][signed[r]].sum()), int(signed[r].sum())
        assert stats.binomtest(k, m, 0.5).pvalue > 1e-3


def test_images_of_one_batch_get_their_own_ops() -> None:
    """One image 128 times, no crop: per-image ops give many different results; one op per batch would give one."""
    img = torch.randint(0, 256, (1, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    ld = BatchLoader(img.expand(128, -1, -1, -1), torch.zeros(128, dtype=torch.int64), 128, train=True, crop_pad=0,
                     randaugment=True)
    xb, _ = next(iter(ld))
    assert len(torch.unique(xb.flatten(1), dim=0)) >= 50
    first_ops = {v // 2 for v, _, _ in ld.epoch_draws().groups[0][0]}
    assert len(first_ops) >= 10  # of 14; each image drew its own


@pytest.mark.parametrize("randaugment", [False, True])
def test_training_epoch_copies_its_draws_to_the_device_once(monkeypatch: pytest.MonkeyPatch,
                                                            randaugment: bool) -> None:
    """Host-to-device transfers during an epoch: one, whatever the number of batches (was three a batch).

    Counted as every ``Tensor.to`` given a device (or a tensor to follow) and every ``torch.tensor`` /
    ``torch.as_tensor`` made on a device: on a CPU they copy nothing, but each is a blocking copy on CUDA.
    """
    x = torch.randint(0, 256, (100, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    ld = BatchLoader(x, torch.arange(100), 16, train=True, randaugment=randaugment)  # its constants move here
    transfers = []
    to, tensor, as_tensor = torch.Tensor.to, torch.tensor, torch.as_tensor

    def counting_to(self: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        if kwargs.get("device") is not None or any(isinstance(a, torch.device | str | torch.Tensor) for a in args):
            transfers.append("Tensor.to")
        return to(self, *args, **kwargs)

    def counting(make: object, label: str) -> object:
        def made(*args: object, **kwargs: object) -> torch.Tensor:
            if kwargs.get("device") is not None:
                transfers.append(label)
            return make(*args, **kwargs)
        return made

    monkeypatch.setattr(torch.Tensor, "to", counting_to)
    monkeypatch.setattr(torch, "tensor", counting(tensor, "torch.tensor"))
    monkeypatch.setattr(torch, "as_tensor", counting(as_tensor, "torch.as_tensor"))
    for epoch in range(2):
        ld.set_epoch(epoch)
        transfers.clear()
        assert sum(len(yb) for _, yb in ld) == 100
        assert transfers == ["Tensor.to"], f"epoch {epoch}: {transfers}"


@pytest.mark.gpu
def test_cuda_epoch_never_waits_for_the_device_and_draws_as_the_cpu_does(cuda: torch.device) -> None:
    """No synchronising call (blocking copy, .item(), .nonzero()) in a whole epoch; the order is the CPU's."""
    x = torch.randint(0, 256, (300, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    y = torch.arange(300)
    on_gpu = BatchLoader(x, y, 64, cuda, train=True, randaugment=True, seed=3)
    on_cpu = BatchLoader(x, y, 64, "cpu", train=True, randaugment=True, seed=3)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        gpu = [(xb, yb) for xb, yb in on_gpu]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    cpu = _batches(on_cpu)
    assert all(torch.equal(g[1].cpu(), c[1]) for g, c in zip(gpu, cpu, strict=True))
    assert all(g[0].shape == c[0].shape and g[0].dtype == torch.float32 for g, c in zip(gpu, cpu, strict=True))
