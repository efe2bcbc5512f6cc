"""The torch-free catalog agrees with the registries that implement it, and the CLI starts without torch."""

from __future__ import annotations

import subprocess
import sys

from compress import catalog
from tests.conftest import REPO


def test_every_registry_holds_the_catalog_names() -> None:
    from compress.models import MODELS
    from compress.quant.backends import BACKENDS
    from compress.quant.observe import OBSERVERS

    assert tuple(MODELS) == catalog.MODELS
    assert set(OBSERVERS) == set(catalog.OBSERVERS)
    assert tuple(BACKENDS) == tuple(catalog.BACKENDS)
    assert BACKENDS["pt2e"].weight_schemes == ("per_channel",) and "qnnpack" not in BACKENDS["pt2e"].engines


def test_the_cli_and_the_specs_load_without_torch() -> None:
    """``--help``, a bad option and the spec checks come before torch (seconds to import) is loaded."""
    code = ("import sys, jobs.launch, jobs.specs, sweeps.search; "
            "jobs.specs.PTQSpec(methods=('pt2e',)); jobs.specs.PruneSpec(final_sparsity=0.9); "
            "print(sorted(m for m in ('torch', 'torchao', 'torchvision', 'ray') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    help_ = subprocess.run([sys.executable, "-m", "jobs.launch", "prune", "--help"], cwd=REPO, capture_output=True,
                           text=True, check=True)
    assert "--final-sparsity" in help_.stdout
