"""The torch mpncov builds against: the installed one, never one the build downloads.

The extension links against torch's C++ libraries, so it must be compiled against the torch
it will run with: the one installed in the Python that runs pip. A torch below the floor is
refused before pip's resolver could replace it with a download (the build would then have
compiled against the old one).
"""
from __future__ import annotations

import re

#: The oldest torch CI builds and tests against (2.11.0+cu130; the CPU build uses 2.13.0).
TORCH_FLOOR = "2.11"
#: What to install when torch is missing: the CPU build CI uses (its CUDA builds are +cu130).
SUGGESTED_TORCH = "2.13.0"


def release(version: str) -> tuple:
    """The numeric release of a version string: '2.13.0+cpu' -> (2, 13, 0), '2.11.0a0' -> (2, 11, 0)."""
    parts = []
    for piece in version.split("+", 1)[0].split("."):
        digits = re.match(r"\d+", piece)
        if digits is None:
            break
        parts.append(int(digits.group()))
        if digits.end() != len(piece):  # a pre-release suffix ends the release part
            break
    return tuple(parts)


def is_supported(version: str) -> bool:
    floor = release(TORCH_FLOOR)
    found = release(version)
    return found[:len(floor)] >= floor


def missing_torch_message(python: str) -> str:
    return (
        f"mpncov builds against the installed torch, and this Python has none ({python}).\n"
        f"Install torch first, e.g. `pip install torch=={SUGGESTED_TORCH}` (or the CUDA build "
        f"your machine needs, torch>={TORCH_FLOOR}), then run `pip install .` again.")


def old_torch_message(python: str, version: str) -> str:
    return (
        f"mpncov needs torch>={TORCH_FLOOR}, and this Python ({python}) has torch {version}.\n"
        f"Install a newer torch first, e.g. `pip install torch=={SUGGESTED_TORCH}`, then run "
        f"`pip install .` again (mpncov builds against the installed torch and never installs "
        f"one itself).")
