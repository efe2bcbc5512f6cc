"""Write a demo image folder from CIFAR-10: the first N training and M test images as PNG files.

    python bench/make_imagefolder.py /tmp/cifar-folder --data-root ../shared/data --train 2000 --val 500

gives ``OUT/train/<class>/<index>.png`` and ``OUT/val/<class>/<index>.png`` (airplane ... truck),
the layout ``--data imagefolder:OUT`` reads; PNG is lossless, so at 32x32 the pixels are CIFAR-10's
and a run on the folder can be checked against one on the built-in set.
"""

from __future__ import annotations

from pathlib import Path

import click

from compress.imagefolder import write_imagefolder


@click.command()
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--data-root", default=None, envvar="COMPRESS_DATA",
              help="CIFAR-10 root (holds cifar-10-batches-bin/ or -py/); default $COMPRESS_DATA")
@click.option("--train", "n_train", default=2000, show_default=True, help="training images to write")
@click.option("--val", "n_val", default=500, show_default=True, help="test images to write (the val/ split)")
def main(out: Path, data_root: str | None, n_train: int, n_val: int) -> None:
    """Write OUT/train/<class>/ and OUT/val/<class>/ PNGs from the first CIFAR-10 images."""
    try:
        written = write_imagefolder(out, data_root, n_train, n_val)
    except ValueError as e:  # DataError (no CIFAR-10 there) or a count out of range: one line, exit 2
        raise click.UsageError(str(e)) from e
    click.echo(f"wrote {written['train']:,} training and {written['val']:,} val images of {written['classes']} "
               f"classes to {written['out']} (use --data imagefolder:{written['out']})")


if __name__ == "__main__":
    main()
