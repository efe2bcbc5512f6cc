"""The torch-free catalog agrees with the registries that implement it, and the CLI starts without torch."""

from __future__ import annotations

import subprocess
import sys

from compress import catalog
from tests.conftest import REPO


def test_every_registry_holds_the_catalog_names() -> None:
    from compress.quant.backends import BACKENDS
    from compress.quant.observe import OBSERVERS

    assert set(OBSERVERS) == set(catalog.OBSERVERS)
    assert tuple(BACKENDS) == tuple(catalog.BACKENDS)
    assert BACKENDS["pt2e"].weight_schemes == ("per_channel",) and "qnnpack" not in BACKENDS["pt2e"].engines


def test_the_budget_check_of_a_run_is_the_rule_of_the_masks() -> None:
    """The same targets pass or fail in ``check_budget`` (before a run) and in ``global_magnitude_masks``."""
    from compress.models import build_model
    from compress.prune import check_budget, global_magnitude_masks

    cases = [(0.5, ("layer3.0.conv2", "layer3.1.conv1", "layer3.1.conv2", "layer3.2.conv1", "layer3.2.conv2"), 1.0),
             (0.3, ("layer3.0.conv2", "layer3.1.conv1", "layer3.1.conv2", "layer3.2.conv1", "layer3.2.conv2"), 1.0),
             (0.9, (), 0.9), (0.9, (), 0.91), (0.93, ("conv1", "linear"), 0.95)]
    outcomes = []
    for sparsity, exclude, cap in cases:
        try:
            check_budget(build_model("resnet20a"), sparsity, exclude, cap)
            error = ""
        except ValueError as e:
            error = str(e)
        try:
            global_magnitude_masks(build_model("resnet20a"), sparsity, exclude, cap)
            built = ""
        except ValueError as e:
            built = str(e)
        assert error.removeprefix(f"final_sparsity={sparsity!r} is invalid: ") == built
        outcomes.append(bool(error))
    assert outcomes == [True, False, True, False, False]


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
