"""Load the compiled extension mpncov._C, or say why it cannot be loaded and what to do.

Two common causes: a source tree without a built extension is imported instead of the
installed package (Python puts the current directory, or the script's, first on sys.path, so
`python -m ...` started from the repository root after a non-editable `pip install .` imports
the repository's mpncov/), and an extension built against another torch than the one running.
"""
from __future__ import annotations

import importlib
import os
import sys
from importlib.machinery import EXTENSION_SUFFIXES

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def built_extension(package_dir: str = PACKAGE_DIR):
    """Path of the _C extension file built for this Python in `package_dir`, or None."""
    for suffix in EXTENSION_SUFFIXES:
        path = os.path.join(package_dir, "_C" + suffix)
        if os.path.isfile(path):
            return path
    return None


def other_installs(package_dir: str = PACKAGE_DIR) -> list:
    """Other mpncov packages on sys.path (e.g. the installed one a source tree shadows)."""
    here = os.path.normcase(os.path.realpath(package_dir))
    found = []
    for entry in sys.path:
        candidate = os.path.join(entry or os.getcwd(), "mpncov")
        if (os.path.isfile(os.path.join(candidate, "__init__.py"))
                and os.path.normcase(os.path.realpath(candidate)) != here
                and candidate not in found):
            found.append(candidate)
    return found


def explain(error: ImportError, package_dir: str = PACKAGE_DIR) -> str:
    """What went wrong loading mpncov._C, and what to do about it."""
    tree = os.path.dirname(package_dir)
    built = built_extension(package_dir)
    if built is None:
        lines = [f"mpncov's compiled extension mpncov._C is not built in {package_dir}."]
        shadowed = [p for p in other_installs(package_dir) if built_extension(p)]
        if shadowed:
            lines.append(f"This mpncov is a source tree ({tree}) that comes first on sys.path (the "
                         f"current directory or the script's) and shadows the installed mpncov in "
                         f"{shadowed[0]}: run from another directory (the benchmark is also the "
                         f"command `mpncov-bench`),")
            lines.append(f"or build the extension in this tree: `pip install -e {tree}`.")
        else:
            lines.append(f"Build it: `pip install -e {tree}` (in place) or `pip install {tree}` "
                         f"(README, Build), then import mpncov from outside the source tree unless "
                         f"the install was editable.")
        return "\n".join(lines)
    lines = [f"mpncov's compiled extension {built} failed to load: {error}"]
    try:
        from ._build_config import BUILT_WITH_TORCH
        import torch
        lines.append(f"It was built against torch {BUILT_WITH_TORCH}; this Python has torch "
                     f"{torch.__version__}.")
    except ImportError:
        pass
    lines.append(f"Rebuild it against the torch of this Python: `pip install -e {tree}` (in place) "
                 f"or `pip install {tree}`.")
    return "\n".join(lines)


def load():
    """Import mpncov._C (which registers the operators), or raise an ImportError that explains."""
    import torch  # noqa: F401  (the extension needs torch's libraries loaded first)

    try:
        return importlib.import_module("mpncov._C")
    except ImportError as error:
        raise ImportError(explain(error)) from error
