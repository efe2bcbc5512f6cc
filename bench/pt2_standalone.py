"""Run an exported int8 program the way a deployment would: torch and torchao only, no project code.

    .venv/bin/python bench/pt2_standalone.py results/runs/RUN/export/CONFIG.int8.pt2pack ../shared/data
    .venv/bin/python bench/pt2_standalone.py results/runs/RUN/export/CONFIG.int8.pt2 ../shared/data --compile

Reads the CIFAR-10 test set from the official binary files with numpy, loads the program (a
``.pt2`` with ``torch.export.load``; a ``.pt2pack`` with the ``pt2pack.py`` the export wrote beside
it), predicts every image on the CPU (optionally through ``torch.compile`` with the oneDNN int8
lowering) and compares top-1 and the sha256 of the predictions with the manifest beside the file.
With ``--compile`` the manifest's predictions are the eager program's, which integer kernels round
differently: then, for a ``.pt2pack``, the ``.pt2`` beside it is compiled too and the two compared
image by image. Prints one line per check and exits 1 on any difference. It imports nothing from
this repository (it checks that too), so it also runs on a machine that has only the files, their
manifests and the data.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import torch
import torchao  # noqa: F401  (registers the int8 ops the program calls)


def test_set(root: Path, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``n`` test images as float [0, 1] (N, 3, 32, 32) and their labels, from test_batch.bin."""
    raw = np.fromfile(root / "cifar-10-batches-bin" / "test_batch.bin", dtype=np.uint8).reshape(-1, 3073)[:n]
    images = torch.from_numpy(raw[:, 1:].reshape(-1, 3, 32, 32).copy()).float().div(255)
    return images, torch.from_numpy(raw[:, 0].astype(np.int64))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("program", type=Path)
    parser.add_argument("data_root", type=Path)
    parser.add_argument("--compile", action="store_true", help="run through torch.compile (oneDNN int8 kernels)")
    parser.add_argument("--batch-size", type=int, default=0, help="default: the manifest's (the export's batches)")
    args = parser.parse_args()

    manifest = json.loads(Path(f"{args.program}.json").read_text())
    data = args.program.read_bytes()
    sha_ok = hashlib.sha256(data).hexdigest() == manifest["sha256"]
    print(f"sha256 {'matches' if sha_ok else 'DIFFERS FROM'} the manifest ({len(data):,} bytes)")
    x, y = test_set(args.data_root, int(manifest["test_images"]))
    preds = predict(load(args.program, args.compile), x, manifest, args.batch_size)
    top1 = 100.0 * float((preds == y).float().mean())
    same = hashlib.sha256(preds.to(torch.uint8).numpy().tobytes()).hexdigest() == manifest["predictions_sha256"]
    print(f"top-1 {top1:.2f}% on {len(y):,} test images; manifest {manifest['expected_top1']:.2f}%; "
          f"predictions {'identical to' if same else 'DIFFERENT FROM'} the export's"
          f"{' (eager; compiled integer kernels round differently)' if args.compile else ''}")
    twin = args.program.with_suffix(".pt2")
    if args.compile and args.program.suffix == ".pt2pack" and twin.is_file():
        same = torch.equal(preds, predict(load(twin, True), x, manifest, args.batch_size))
        print(f"compiled predictions {'identical to' if same else 'DIFFERENT FROM'} the compiled {twin.name}'s")
    ours = sorted(k for k in sys.modules if k.split(".")[0] in ("compress", "jobs", "sweeps"))
    print(f"project modules imported: {ours or 'none'}")
    return 0 if sha_ok and same and not ours else 1


def load(path: Path, compile_: bool) -> torch.nn.Module:
    """The program of a ``.pt2`` or ``.pt2pack`` (through the loader beside it), compiled for oneDNN int8 or not."""
    if path.suffix == ".pt2pack":
        sys.path.insert(0, str(path.parent))  # the pt2pack.py the export wrote beside the file
        import pt2pack

        model = pt2pack.load(path)
        return pt2pack.compile_int8(model) if compile_ else model
    model = torch.export.load(path).module()
    if compile_:
        # registers torchao's inductor lowering of q/dq + conv to oneDNN int8 kernels; freezing makes the
        # weights constants it can prepack (without both, the program compiles to float convolutions)
        import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer  # noqa: F401

        torch._inductor.config.freezing = True
        model = torch.compile(model)
    return model


def predict(model: torch.nn.Module, x: torch.Tensor, manifest: dict, batch_size: int) -> torch.Tensor:
    """The predicted class of every image, fed in the layout and batches the export measured with."""
    # the program computes its convolutions in float on dequantized values, so the memory layout and
    # the batch change the rounding of a few activations: feed them as the export did (its manifest says)
    fed = manifest.get("input", {})
    if fed.get("memory_format") == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    bs = batch_size or int(fed.get("batch_size", 500))
    with torch.no_grad():
        return torch.cat([model(x[i:i + bs]).argmax(1) for i in range(0, len(x), bs)])


if __name__ == "__main__":
    sys.exit(main())
