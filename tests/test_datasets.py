"""Data specs, image folders, dataset factories, streaming and the loaders over them.

Image folders are written here as real PNG files (tiny synthetic ones for the error cases, the
first real CIFAR-10 images for parity with the built-in reader); factories are real modules on
``sys.path``: ``examples/digits.py`` and a few broken ones written per test session.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from compress.data import CIFAR_CLASSES, BatchLoader, DataError, data_probe, load_cifar10, load_test_labels
from compress.datasets import (
    ImageData,
    Split,
    channel_stats,
    data_probe_for,
    load_data,
    load_test_labels_for,
    make_loader,
    parse_data,
)
from compress.imagefolder import write_imagefolder
from compress.stream import StreamLoader

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples"
N_TRAIN, N_VAL = 200, 100


def _batches(loader: BatchLoader | StreamLoader) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x.clone(), y.clone()) for x, y in loader]


def _same(a: list, b: list) -> bool:
    return len(a) == len(b) and all(torch.equal(x1, x2) and torch.equal(y1, y2)
                                    for (x1, y1), (x2, y2) in zip(a, b, strict=True))


# --- specs ------------------------------------------------------------------------------------

@pytest.mark.parametrize(("text", "parsed"), [
    ("cifar10", ("cifar10", "")),
    ("imagefolder:/data/pets", ("imagefolder", "/data/pets")),
    ("imagefolder:rel/dir", ("imagefolder", "rel/dir")),
    ("digits:load", ("factory", "digits:load")),
    ("my_pkg.data_mod:make_sets", ("factory", "my_pkg.data_mod:make_sets")),
])
def test_parse_data_accepts_the_three_forms(text: str, parsed: tuple[str, str]) -> None:
    assert parse_data(text) == parsed


@pytest.mark.parametrize("text", ["", "cifar100", "imagefolder:", "imagefolder", "pkg.mod:", ":load",
                                  "pkg..mod:load", "pkg.mod:load:x", "pkg-mod:load", "pkg.mod:1st"])
def test_parse_data_refuses_anything_else_in_one_line(text: str) -> None:
    with pytest.raises(ValueError, match=r"is not a data spec: use cifar10, imagefolder:ROOT .* or "
                                         r"package\.module:function$") as e:
        parse_data(text)
    assert "\n" not in str(e.value)


def test_parse_data_does_not_import_torch() -> None:
    code = ("import sys; from compress.datasets import parse_data; parse_data('imagefolder:/x'); "
            "assert 'torch' not in sys.modules, 'torch imported'")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


# --- synthetic image folders: the loader's checks -----------------------------------------------------

def _png(path: Path, seed: int, size: tuple[int, int] = (12, 10), mode: str = "RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(path)


def _folder(root: Path, layout: dict[str, dict[str, int]]) -> Path:
    """``layout``: split -> class -> image count; 12x10 random images, the first of each class grayscale."""
    seed = 0
    for split, classes in layout.items():
        for name, count in classes.items():
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(count):
                _png(root / split / name / f"{i:03d}.png", seed, mode="L" if i == 0 else "RGB")
                seed += 1
    return root


GOOD = {"train": {"ant": 3, "bee": 2, "cat": 4}, "val": {"ant": 1, "bee": 2, "cat": 1}}


def test_image_folder_resizes_to_rgb_squares_in_folder_order(tmp_path: Path) -> None:
    root = _folder(tmp_path / "f", GOOD)
    data = load_data(f"imagefolder:{root}", image_size=8, workers=0)
    assert (len(data.train), len(data.test), data.num_classes) == (9, 4, 3)
    assert data.image_shape == (3, 8, 8) and data.train.x.shape == (9, 3, 8, 8) and data.train.x.dtype == torch.uint8
    assert data.train.y.tolist() == [0, 0, 0, 1, 1, 2, 2, 2, 2] and data.test.y.tolist() == [0, 1, 1, 2]
    grey = data.train.x[0]
    assert torch.equal(grey[0], grey[1]) and torch.equal(grey[1], grey[2])  # "L" read as RGB
    with Image.open(root / "train" / "bee" / "001.png") as im:
        ref = np.asarray(im.convert("RGB").resize((8, 8), Image.Resampling.BILINEAR))
    assert torch.equal(data.train.x[4], torch.from_numpy(ref.copy()).permute(2, 0, 1))
    assert data.describe() == {"data_kind": "imagefolder", "data_source": str(root), "data_classes": 3,
                               "data_shape": "3x8x8", "data_mean": ",".join(f"{v:.6g}" for v in data.mean),
                               "data_std": ",".join(f"{v:.6g}" for v in data.std), "data_streamed": False}
    assert load_data(f"imagefolder:{root}", workers=0).image_shape == (3, 32, 32)  # image_size 0: 32


def test_image_folder_errors_are_one_line_before_anything_trains(tmp_path: Path) -> None:
    def refused(root: Path, match: str, **kw: object) -> str:
        with pytest.raises(DataError, match=match) as e:
            load_data(f"imagefolder:{root}", workers=0, **kw)
        assert "\n" not in str(e.value)
        return str(e.value)

    refused(tmp_path / "nowhere", f"image folder {tmp_path / 'nowhere'} does not exist")
    (tmp_path / "empty").mkdir()
    refused(tmp_path / "empty", r"has no train/ folder: put each class's images in .*/empty/train/<class>/")
    (tmp_path / "empty" / "train").mkdir()
    (tmp_path / "empty" / "val" / "cat").mkdir(parents=True)
    refused(tmp_path / "empty", r"empty/train has no class folders: put each class's images in .*train/<class>/")

    mismatch = _folder(tmp_path / "mismatch", {"train": {"ant": 1, "bee": 1}, "val": {"ant": 1, "cow": 1}})
    refused(mismatch, "must hold the same class folders: only in train: bee; only in val: cow")

    no_images = _folder(tmp_path / "noimg", GOOD)
    (no_images / "val" / "bee" / "000.png").unlink()
    (no_images / "val" / "bee" / "001.png").rename(no_images / "val" / "bee" / "001.txt")
    refused(no_images, r"class folder .*noimg/val/bee has no images \(1 of 3 classes empty; extensions read: .jpg")


@pytest.mark.parametrize("workers", [0, 2])
def test_a_corrupt_image_is_named_even_when_a_worker_reads_it(tmp_path: Path, workers: int) -> None:
    root = _folder(tmp_path / "f", GOOD)
    bad = root / "train" / "bee" / "001.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    with pytest.raises(DataError, match=f"^cannot read image {bad}: ") as e:
        load_data(f"imagefolder:{root}", workers=workers)
    assert "\n" not in str(e.value) and "Traceback" not in str(e.value)
    with pytest.raises(DataError, match=f"^cannot read image {bad}: "):  # streamed: the statistics sample
        load_data(f"imagefolder:{root}", workers=workers, max_memory_bytes=1)


def test_a_corrupt_image_in_a_streamed_split_stops_its_loader_in_one_line(tmp_path: Path) -> None:
    root = _folder(tmp_path / "f", GOOD)
    bad = root / "val" / "cat" / "000.png"
    bad.write_bytes(b"")
    data = load_data(f"imagefolder:{root}", workers=0, max_memory_bytes=1)  # val is not read until used
    assert data.test.streamed and data.test.labels().tolist() == [0, 1, 1, 2]
    with pytest.raises(DataError, match=f"^cannot read image {bad}: [^\n]*$"):
        list(make_loader(data.test, 2, workers=2))


def test_streamed_image_folder_batches_depend_on_seed_and_epoch_only(tmp_path: Path) -> None:
    root = _folder(tmp_path / "f", {"train": {"a": 12, "b": 13}, "val": {"a": 2, "b": 3}})
    data = load_data(f"imagefolder:{root}", image_size=16, workers=0, max_memory_bytes=1)
    assert data.train.streamed and data.describe()["data_streamed"] and len(data.train) == 25

    def epoch(workers: int, seed: int, *key: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        ld = make_loader(data.train, 8, train=True, randaugment=True, seed=seed, workers=workers)
        ld.set_epoch(*key)
        return _batches(ld)

    first = epoch(0, 1, 0, 3)
    assert [len(y) for _, y in first] == [8, 8, 8, 1]
    assert _same(first, epoch(2, 1, 0, 3)), "the number of workers changed the batches"
    assert not _same(first, epoch(0, 1, 0, 4)) and not _same(first, epoch(0, 2, 0, 3))
    assert sorted(torch.cat([y for _, y in first]).tolist()) == sorted(data.train.labels().tolist())
    x = first[0][0]
    assert x.dtype == torch.float32 and x.shape == (8, 3, 16, 16) and x.is_contiguous(memory_format=torch.channels_last)
    assert float(x.min()) >= 0 and float(x.max()) <= 1


# --- the real CIFAR-10 as an image folder ----------------------------------------------------------

@pytest.fixture(scope="module")
def cifar_folder(real_data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    """The first 200 training and 100 test CIFAR-10 images as PNGs, and the CIFAR-10 they came from."""
    out = tmp_path_factory.mktemp("cifar-folder")
    written = write_imagefolder(out, real_data_root, N_TRAIN, N_VAL)
    assert written == {"out": str(out), "train": N_TRAIN, "val": N_VAL, "classes": 10}
    return out, load_cifar10(real_data_root)


@pytest.mark.realdata
def test_image_folder_of_cifar_pngs_reads_back_the_cifar_pixels(cifar_folder: tuple[Path, object]) -> None:
    root, cifar = cifar_folder
    assert sorted(p.name for p in (root / "train").iterdir()) == list(CIFAR_CLASSES)
    data = load_data(f"imagefolder:{root}", image_size=32, workers=2)
    assert (len(data.train), len(data.test), data.num_classes, data.image_shape) == (N_TRAIN, N_VAL, 10, (3, 32, 32))
    for split, x, y, n in ((data.train, cifar.train_x, cifar.train_y, N_TRAIN),
                           (data.test, cifar.test_x, cifar.test_y, N_VAL)):
        order = torch.from_numpy(np.argsort(y[:n].numpy(), kind="stable"))  # class folders, then file names
        assert torch.equal(split.y, y[:n][order]) and torch.equal(split.x, x[:n][order])
    ref = cifar.train_x[:N_TRAIN].numpy() / 255.0
    assert np.allclose(data.mean, ref.mean(axis=(0, 2, 3)), rtol=0, atol=1e-12)
    assert np.allclose(data.std, ref.std(axis=(0, 2, 3)), rtol=0, atol=1e-12)


@pytest.mark.realdata
def test_streamed_cifar_folder_gives_the_in_memory_test_batches(cifar_folder: tuple[Path, object]) -> None:
    root, _ = cifar_folder
    memory = load_data(f"imagefolder:{root}", workers=0)
    streamed = load_data(f"imagefolder:{root}", workers=0, max_memory_bytes=3 * 32 * 32 * (N_TRAIN + N_VAL) - 1)
    assert streamed.train.streamed and streamed.test.streamed and not memory.train.streamed
    assert np.allclose(streamed.mean, memory.mean, rtol=0, atol=1e-12)  # 200 < the 10,000-image sample
    assert isinstance(make_loader(streamed.test, 32), StreamLoader)
    assert isinstance(make_loader(memory.test, 32), BatchLoader)
    assert _same(_batches(make_loader(streamed.test, 32, workers=2)), _batches(make_loader(memory.test, 32)))

    def train_epoch(key: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        ld = make_loader(streamed.train, 64, train=True, seed=5, workers=2)
        ld.set_epoch(key)
        return _batches(ld)

    assert _same(train_epoch(1), train_epoch(1)) and not _same(train_epoch(1), train_epoch(2))


@pytest.mark.realdata
def test_probe_and_test_labels_of_each_kind(cifar_folder: tuple[Path, object], real_data_root: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    root, _ = cifar_folder
    assert data_probe_for("cifar10", real_data_root) == data_probe(real_data_root)
    assert data_probe_for(f"imagefolder:{root}", None) == root / "val"
    assert np.array_equal(load_test_labels_for("cifar10", real_data_root), load_test_labels(real_data_root))
    labels = load_test_labels_for(f"imagefolder:{root}", None)
    assert labels.dtype == np.int64 and np.array_equal(labels, load_data(f"imagefolder:{root}", workers=0).test.y)
    monkeypatch.syspath_prepend(str(EXAMPLES))
    assert data_probe_for("digits:load", None) == EXAMPLES / "digits.py"
    assert np.array_equal(load_test_labels_for("digits:load", None), load_data("digits:load", workers=0).test.y)


def test_cifar10_spec_is_the_built_in_reader(synthetic_cifar: Path) -> None:
    from compress.models import CIFAR_MEAN

    data = load_data("cifar10", synthetic_cifar)
    raw = load_cifar10(synthetic_cifar)
    assert torch.equal(data.train.x, raw.train_x) and torch.equal(data.test.y, raw.test_y)
    assert (data.num_classes, data.image_shape, data.mean, data.std) == (10, (3, 32, 32), CIFAR_MEAN,
                                                                        (0.2470, 0.2435, 0.2616))
    assert load_data("cifar10", synthetic_cifar, mean=(0.5,) * 3, std=(0.25,) * 3).std == (0.25,) * 3
    ld = make_loader(data.train, 50, train=True, seed=3)
    ref = BatchLoader(raw.train_x, raw.train_y, 50, train=True, seed=3)
    assert ld.crop_pad == 4 and _same(_batches(ld), _batches(ref))
    with pytest.raises(DataError, match="one value per channel"):
        load_data("cifar10", synthetic_cifar, mean=(0.5,) * 3)
    with pytest.raises(DataError, match="CIFAR-10 images are 32x32"):
        load_data("cifar10", synthetic_cifar, image_size=64)
    with pytest.raises(DataError, match="is not a data spec"):
        load_data("cifar-10", synthetic_cifar)


# --- factories ----------------------------------------------------------------------------------

def test_digits_factory_in_memory_and_its_augmented_batches(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(EXAMPLES))
    data = load_data("digits:load", workers=0)
    assert (len(data.train), len(data.test), data.num_classes, data.image_shape) == (1437, 360, 10, (1, 8, 8))
    assert data.train.x.dtype == torch.float32 and float(data.train.x.max()) == 1.0
    assert data.kind == "factory" and data.source == "digits:load"
    assert data.describe()["data_shape"] == "1x8x8" and data.describe()["data_mean"] == f"{data.mean[0]:.6g}"
    from sklearn.datasets import load_digits

    ref = load_digits().images[np.random.default_rng(0).permutation(1797)[:1437]] / 16.0
    assert np.allclose(data.mean, [ref.mean()], rtol=0, atol=1e-12)
    assert np.allclose(data.std, [ref.std()], rtol=0, atol=1e-12)

    ld = make_loader(data.train, 256, train=True, randaugment=True, seed=0)
    assert ld.crop_pad == 1  # an eighth of 8 pixels
    batches = _batches(ld)
    x = torch.cat([b[0] for b in batches])
    assert x.shape == (1437, 1, 8, 8) and x.dtype == torch.float32 and 0 <= float(x.min()) <= float(x.max()) <= 1
    assert sorted(torch.cat([b[1] for b in batches]).tolist()) == sorted(data.train.y.tolist())
    plain = _batches(make_loader(data.test, 100))
    assert torch.equal(torch.cat([b[0] for b in plain]), data.test.x)  # float images are not divided by 255


def test_digits_factory_streamed_matches_in_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(EXAMPLES))
    memory = load_data("digits:load", workers=0)
    streamed = load_data("digits:load", workers=0, max_memory_bytes=1000)
    assert streamed.test.streamed and streamed.num_classes == 10 and streamed.image_shape == (1, 8, 8)
    assert np.allclose(streamed.mean, memory.mean, rtol=0, atol=1e-12)
    assert _same(_batches(make_loader(streamed.test, 64, workers=0)), _batches(make_loader(memory.test, 64)))
    ld = make_loader(streamed.train, 128, train=True, randaugment=True, workers=0)
    assert sum(len(y) for _, y in ld) == 1437
    ref = make_loader(memory.train, 128, train=True)
    ld.set_epoch(2, 7)
    ref.set_epoch(2, 7)
    assert ld.epoch_seed() == ref.epoch_seed()  # one (seed, key), one order seed, in memory or streamed
    sub = streamed.test.subset(torch.tensor([5, 0, 7]))
    assert len(sub) == 3 and torch.equal(sub.labels(), memory.test.y[[5, 0, 7]])
    assert torch.equal(memory.test.subset(torch.tensor([5, 0, 7])).x, memory.test.x[[5, 0, 7]])


FACTORIES = '''
import torch
from torch.utils.data import TensorDataset


def raises():
    raise TypeError("no data here\\nsecond line")


def one():
    return TensorDataset(torch.zeros(4, 1, 2, 2))


def three():
    return 1, 2, 3


def not_pairs():
    return [torch.zeros(1, 2, 2)] * 3, [torch.zeros(1, 2, 2)] * 3


def flat_images():
    return TensorDataset(torch.zeros(4, 4), torch.zeros(4)), TensorDataset(torch.zeros(4, 4), torch.zeros(4))


def unscaled():
    x = torch.full((4, 3, 2, 2), 200.0)
    return TensorDataset(x, torch.arange(4)), TensorDataset(x, torch.arange(4))


def uint8_no_classes():
    x = torch.arange(4 * 3 * 2 * 2, dtype=torch.uint8).reshape(4, 3, 2, 2)
    return TensorDataset(x, torch.tensor([0, 4, 1, 2])), TensorDataset(x[:2], torch.tensor([6, 0]))


class Broken(torch.utils.data.Dataset):
    def __len__(self):
        return 3

    def __getitem__(self, i):
        if i == 2:
            raise KeyError("lost")
        return torch.zeros(1, 2, 2), 0


def broken_item():
    return Broken(), Broken()
'''


@pytest.fixture
def factories(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    (tmp_path / "test_data_factories.py").write_text(FACTORIES)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "test_data_factories", raising=False)
    return "test_data_factories"


@pytest.mark.parametrize(("fn", "match"), [
    ("raises", r"^data factory test_data_factories:raises raised TypeError: no data here$"),
    ("one", r"returned a TensorDataset; it must return a pair \(train, test\) of datasets whose items are"),
    ("three", r"returned a tuple of 3; it must return a pair \(train, test\)"),
    ("not_pairs", r"item 0 is a Tensor, not a pair \(image tensor CxHxW, int label\)"),
    ("flat_images", r"item 0 has a tensor of shape \(4,\) as its image"),
    ("unscaled", r"float images must be in \[0, 1\], found values in \[200, 200\]"),
    ("broken_item", r"\(train\): reading item 2 raised KeyError: 'lost'$"),
    ("missing", r"data factory module test_data_factories has no function missing: it must be importable"),
])
def test_factory_errors_are_one_line(factories: str, fn: str, match: str) -> None:
    with pytest.raises(DataError, match=match) as e:
        load_data(f"{factories}:{fn}", workers=0)
    assert "\n" not in str(e.value)


def test_factory_module_must_be_importable() -> None:
    with pytest.raises(DataError, match=r"cannot import data factory module no_such_pkg.data \(No module named "
                                        r"'no_such_pkg'\): it must be importable .*PYTHONPATH"):
        load_data("no_such_pkg.data:load")
    with pytest.raises(DataError, match="cannot find data factory module no_such_pkg.data .*PYTHONPATH"):
        data_probe_for("no_such_pkg.data:load", None)


def test_factory_classes_from_labels_and_uint8_kept(factories: str) -> None:
    data = load_data(f"{factories}:uint8_no_classes", workers=0)
    assert data.num_classes == 7 and data.train.x.dtype == torch.uint8  # max label 6 over both splits, + 1
    ref = data.train.x.numpy() / 255.0
    assert np.allclose(data.mean, ref.mean(axis=(0, 2, 3)), rtol=0, atol=1e-12)
    assert np.allclose(data.std, ref.std(axis=(0, 2, 3)), rtol=0, atol=1e-12)
    streamed = load_data(f"{factories}:uint8_no_classes", workers=0, max_memory_bytes=1)
    assert streamed.num_classes == 7 and streamed.test.labels().tolist() == [6, 0]
    with pytest.raises(DataError, match="image_size 4 applies to image folders; .* gives 3x2x2 images"):
        load_data(f"{factories}:uint8_no_classes", image_size=4)
    with pytest.raises(DataError, match=r"data mean has 1 values \(0.5\); the images have 3 channels"):
        load_data(f"{factories}:uint8_no_classes", mean=(0.5,), std=(0.5,), workers=0)


# --- pieces ---------------------------------------------------------------------------------------

def test_channel_stats_of_uint8_extremes_and_a_constant_image() -> None:
    x = torch.zeros(2, 2, 4, 4, dtype=torch.uint8)
    x[0, 0] = 255
    mean, std = channel_stats([x])
    assert mean == (0.5, 0.0) and std == (0.5, 0.0)
    half = torch.full((3, 1, 2, 2), 0.25)
    assert channel_stats([half[:1], half[1:]]) == ((0.25,), (0.0,))
    with pytest.raises(DataError, match="no training images"):
        channel_stats([])


def test_split_holds_tensors_or_a_dataset() -> None:
    with pytest.raises(ValueError, match="either images and labels"):
        Split(None, None)
    with pytest.raises(ValueError, match="3 images but 2 labels"):
        Split(torch.zeros(3, 1, 2, 2), torch.zeros(2, dtype=torch.int64))
    s = Split(torch.zeros(3, 1, 2, 2), torch.tensor([2, 0, 1]))
    assert len(s) == 3 and not s.streamed and s.labels().tolist() == [2, 0, 1]
    data = ImageData(s, s, 3, (1, 2, 2), (0.0,), (1.0,), "factory", "m:f")
    assert data.describe()["data_streamed"] is False


def test_batch_loader_takes_float_images_of_any_shape() -> None:
    x = torch.rand(10, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    y = torch.arange(10)
    got = torch.cat([b[0] for b in BatchLoader(x, y, 4)])
    assert torch.equal(got, x)  # not divided by 255, and a copy:
    got.zero_()
    assert float(x.sum()) > 0
    train = _batches(make_loader(Split(x, y), 4, train=True, randaugment=True))
    assert all(b[0].shape[1:] == (1, 8, 8) and b[0].dtype == torch.float32 for b in train)
