"""The torch-free catalog agrees with the registries that implement it, and the CLI starts without torch."""

from __future__ import annotations

import subprocess
import sys

import pytest

from compress import catalog
from tests.conftest import REPO


def test_every_registry_holds_the_catalog_names() -> None:
    from compress.quant.backends import BACKENDS
    from compress.quant.observe import OBSERVERS

    assert set(OBSERVERS) == set(catalog.OBSERVERS)
    assert tuple(BACKENDS) == tuple(catalog.BACKENDS)
    assert BACKENDS["pt2e"].weight_schemes == ("per_channel",) and "qnnpack" not in BACKENDS["pt2e"].engines


def test_the_budget_check_refuses_exactly_the_targets_the_masks_cannot_place() -> None:
    """A target the check passes is placed by global magnitude pruning (that many zeros, the kept layers dense,
    no layer over the cap); one it refuses says which limit, in numbers the layers give."""
    from compress.models import build_model
    from compress.prune import check_budget, global_magnitude_masks, prunable

    layer3 = ("layer3.0.conv2", "layer3.1.conv1", "layer3.1.conv2", "layer3.2.conv1", "layer3.2.conv2")
    sizes = {n: m.weight.numel() for n, m in prunable(build_model("resnet20a"))}
    total, outside = sum(sizes.values()), sum(n for k, n in sizes.items() if k not in layer3)
    assert (total, outside) == (268_336, 84_016)  # five 36,864-weight convs kept dense
    refused = {  # (sparsity, kept dense, cap) -> the limit named
        (0.5, layer3, 1.0): f"needs {round(0.5 * total):,} zeros but only {outside:,} weights are outside",
        (0.9, (), 0.9): f"a per-layer cap of 0.9 allows only {sum(int(0.9 * n) for n in sizes.values()):,}",
    }
    for (sparsity, keep, cap), message in refused.items():
        with pytest.raises(ValueError, match=message):
            check_budget(build_model("resnet20a"), sparsity, keep, cap)
    for sparsity, keep, cap in [(0.3, layer3, 1.0), (0.9, (), 0.91), (0.93, ("conv1", "linear"), 0.95)]:
        model = build_model("resnet20a")
        check_budget(model, sparsity, keep, cap)
        masks = global_magnitude_masks(model, sparsity, keep, cap)
        zeros = {n: int((~masks.masks[f"{n}.weight"]).sum()) for n in sizes if f"{n}.weight" in masks.masks}
        assert sum(zeros.values()) == round(sparsity * total)
        assert all(zeros.get(n, 0) == 0 for n in keep)
        assert all(z <= int(cap * sizes[n]) for n, z in zeros.items())


def test_the_cli_and_the_specs_load_without_torch() -> None:
    """``--help``, a bad option and the spec checks come before torch (seconds to import) is loaded."""
    code = ("import sys, jobs.launch, jobs.specs, sweeps.search; "
            "jobs.specs.PTQSpec(methods=('pt2e',)); jobs.specs.PruneSpec(final_sparsity=0.9); "
            "jobs.specs.PruneSpec(final_sparsity=0.9, keep_dense=('conv1', 'linear'), max_layer_sparsity=0.95); "
            "jobs.specs.TrainSpec(model='timm:resnet18', model_args='num_classes=10', data='mynets:data'); "
            "print(sorted(m for m in ('torch', 'torchao', 'torchvision', 'ray') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    help_ = subprocess.run([sys.executable, "-m", "jobs.launch", "prune", "--help"], cwd=REPO, capture_output=True,
                           text=True, check=True)
    assert "--final-sparsity" in help_.stdout
