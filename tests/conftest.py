"""Shared fixtures: a tiny synthetic CIFAR-10 in the real binary layout, and the real data when present.

``synthetic_cifar`` writes ``cifar-10-batches-bin/`` (five 50-image training files and a 100-image
test file, records of 1 label byte + 3,072 pixel bytes) once per session, so every test goes
through the real reader. Each class has its own colour, so a model can learn it in a few epochs.

``real_data_root`` and ``real_weights`` point at the real CIFAR-10 and the option-A ResNet-20
weights (``$COMPRESS_DATA`` / ``$COMPRESS_WEIGHTS``, else ``<repo>/../shared/...``) and skip the
test, saying where they looked, when those are absent. Both are read when this file is imported,
before ``_isolated_env`` clears the variables for each test.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from compress.data import BIN_DIR

REPO = Path(__file__).resolve().parent.parent
REAL_DATA = Path(os.environ.get("COMPRESS_DATA") or REPO.parent / "shared" / "data")
REAL_WEIGHTS = Path(os.environ.get("COMPRESS_WEIGHTS") or REPO.parent / "shared" / "weights" / "resnet20-12fca82f.th")

TRAIN_PER_FILE = 50
TEST_IMAGES = 100
# one RGB colour per class, far apart so a few epochs separate them
CLASS_COLOURS = np.array([[230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48],
                          [145, 30, 180], [70, 240, 240], [240, 50, 230], [128, 128, 0], [0, 0, 128]],
                         dtype=np.int16)

# The tests' batches (8 to 100 tiny images) are too small for intra-op threads to pay, and on a
# shared 2-core machine every join of a second thread can wait for a scheduler slice: measured
# under load, a 2-phase synthetic prune run took 34 s on 2 threads and 12 s on one. An explicit
# OMP_NUM_THREADS still wins. Tests over the real data (1,000-image batches) ask for
# ``torch_threads`` to get torch's default back.
DEFAULT_THREADS = torch.get_num_threads()
if "OMP_NUM_THREADS" not in os.environ:
    torch.set_num_threads(1)

# variables the code reads; a test must not depend on the shell it was started from
PROJECT_ENV = ("COMPRESS_DATA", "COMPRESS_WEIGHTS", "COMPRESS_RESULTS", "COMPRESS_SEARCH_ID", "COMPRESS_TRIAL_ID")


def synthetic_records(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` labelled images (uint8 (n, 3, 32, 32), labels 0..9 cycling): class colour +-40 noise."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 10
    rng.shuffle(labels)
    noise = rng.integers(-40, 41, size=(n, 3, 32, 32), dtype=np.int16)
    images = np.clip(CLASS_COLOURS[labels][:, :, None, None] + noise, 0, 255).astype(np.uint8)
    return images, labels.astype(np.uint8)


def write_bin_file(path: Path, images: np.ndarray, labels: np.ndarray) -> None:
    """The CIFAR-10 binary record layout: per image 1 label byte, then 1,024 R, 1,024 G, 1,024 B bytes."""
    records = np.concatenate([labels[:, None], images.reshape(len(images), -1)], axis=1)
    path.write_bytes(records.astype(np.uint8).tobytes())


@pytest.fixture(scope="session")
def synthetic_cifar(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Root folder holding ``cifar-10-batches-bin/`` with 250 training and 100 test images."""
    root = tmp_path_factory.mktemp("cifar")
    folder = root / BIN_DIR
    folder.mkdir()
    for i in range(1, 6):
        write_bin_file(folder / f"data_batch_{i}.bin", *synthetic_records(TRAIN_PER_FILE, seed=i))
    write_bin_file(folder / "test_batch.bin", *synthetic_records(TEST_IMAGES, seed=0))
    return root


@pytest.fixture(scope="session")
def synthetic_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A seeded, freshly initialised resnet20a saved as a plain state dict (starting weights of a job)."""
    from compress.models import build_model

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "resnet20a-init.pt"
    torch.save(build_model("resnet20a").state_dict(), path)
    return path


@pytest.fixture(scope="session")
def real_data_root() -> Path:
    """The real CIFAR-10 root (holds cifar-10-batches-bin/); skips when absent."""
    if not (REAL_DATA / BIN_DIR).is_dir() and not (REAL_DATA / "cifar-10-batches-py").is_dir():
        pytest.skip(f"real CIFAR-10 not found under {REAL_DATA} (set COMPRESS_DATA)")
    return REAL_DATA


@pytest.fixture(scope="session")
def real_weights() -> Path:
    """The real option-A ResNet-20 weights file; skips when absent."""
    if not REAL_WEIGHTS.is_file():
        pytest.skip(f"real weights not found at {REAL_WEIGHTS} (set COMPRESS_WEIGHTS)")
    return REAL_WEIGHTS


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Clear the project's environment variables: defaults must come from the test, not the shell."""
    for name in PROJECT_ENV:
        monkeypatch.delenv(name, raising=False)


# modules the tests write as a user would (a model module outside the repository) or take from examples/:
# each test imports its own version, never one another test left in sys.modules
USER_MODULES = ("mynets", "digits")


@pytest.fixture(autouse=True)
def _fresh_user_modules() -> Iterator[None]:
    for name in USER_MODULES:
        sys.modules.pop(name, None)
    yield
    for name in USER_MODULES:
        sys.modules.pop(name, None)


@pytest.fixture
def device() -> torch.device:
    """Where the loops of a test run: CUDA when visible, else the CPU."""
    from compress.loops import pick_device

    return pick_device("auto")


@pytest.fixture
def cuda() -> torch.device:
    """A CUDA device for a ``gpu`` test; skips, saying so, on a machine without one."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device: torch sees none on this machine (run on a GPU node)")
    return torch.device("cuda")


@pytest.fixture
def torch_threads() -> Iterator[int]:
    """torch's default intra-op thread count for the test, for big real-data batches; restored after."""
    saved = torch.get_num_threads()
    torch.set_num_threads(DEFAULT_THREADS)
    yield DEFAULT_THREADS
    torch.set_num_threads(saved)


def count_prunable(model: torch.nn.Module) -> int:
    """Number of conv+linear weights (biases excluded): 268,336 for resnet20a."""
    from compress.models import prunable

    return sum(m.weight.numel() for _, m in prunable(model))


def is_close_to(value: float, target: float, n: int) -> bool:
    """True when ``value`` is ``target`` to within one weight out of ``n``."""
    return math.isclose(value, target, abs_tol=1.0 / n + 1e-12)
