"""The machine a benchmark ran on, printed beside its figures (speed depends on the CPU's instruction sets).

Benchmarks run as scripts (``python bench/X.py``), so this folder is on ``sys.path`` and they
``from machine import cpu_description``.
"""

from __future__ import annotations

from pathlib import Path

# what int8 and bf16 kernels on x86 depend on
ISA_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "amx_int8")


def cpu_description() -> tuple[str, list[str], list[str]]:
    """The CPU's model name and which of ``ISA_FLAGS`` /proc/cpuinfo lists (present, absent)."""
    name, flags = "unknown CPU", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and name == "unknown CPU":
                name = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    except OSError:  # not Linux: the figures still print, without the instruction sets
        pass
    return name, [f for f in ISA_FLAGS if f in flags], [f for f in ISA_FLAGS if f not in flags]


def cpu_line() -> str:
    """One line: ``CPU: <model>; avx2 present; avx512f, ... absent``."""
    name, present, absent = cpu_description()
    return (f"CPU: {name}; {', '.join(present) or 'none'} present"
            + (f"; {', '.join(absent)} absent" if absent else ""))
