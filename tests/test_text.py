"""The one table renderer and the one error-line rule behind everything the commands print."""

from __future__ import annotations

from jobs.text import error_line, table


def test_table_aligns_columns_and_draws_the_rules() -> None:
    text = table([("name", "n"), ("a", "10"), ("total", "1,000")], right={1}, rule=True, total=True)
    assert text.splitlines() == ["name       n", "-" * 12, "a         10", "-" * 12, "total  1,000"]
    assert table([("A", "LOG"), ("xx", "some/long/path")], last_free=True).splitlines() == [
        "A   LOG", "xx  some/long/path"]


class _Wrapped(Exception):
    """What Ray raises for a failed trial: the original exception as ``cause``."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__("ray.exceptions.RayTaskError(...)")
        self.cause = cause


def test_error_line_of_an_exception_a_traceback_and_a_log() -> None:
    assert error_line(None) == "" and error_line("") == ""
    assert error_line(ValueError("lr=0 is invalid\nmore")) == "ValueError: lr=0 is invalid"
    assert error_line(_Wrapped(KeyError("x"))) == "KeyError: 'x'"
    tb = "Traceback (most recent call last):\n  File \"x.py\"\ncompress.data.DataError: CIFAR-10 not found\n\n"
    assert error_line(tb) == "compress.data.DataError: CIFAR-10 not found"
    log = "epoch 1\nRuntimeError: CUDA out of memory\nepoch 2 done\n"
    assert error_line(log, log=True) == "RuntimeError: CUDA out of memory"
    assert error_line("epoch 1\nepoch 2 done\n", log=True) == "epoch 2 done"
    assert error_line("slurmstepd: error: *** JOB 7 CANCELLED AT 10:00 DUE TO TIME LIMIT ***\n", log=True).endswith(
        "DUE TO TIME LIMIT ***")
