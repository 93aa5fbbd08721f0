"""Committed benchmark results (``results/``) and two convenience commands for the
repository root: ``python -m benchmarks.run`` and ``python -m benchmarks.profile_kernels``
run ``mpncov.benchmarks`` and ``mpncov.benchmarks.profile_kernels`` (the code lives in the
installed package; these are only entry points).

Started from the repository root, ``import mpncov`` finds the source tree's ``mpncov/``
first. After an editable install it holds the built extension and is used. After a
non-editable ``pip install .`` it has none and would fail to import; then the installed
mpncov is used instead, with a note saying so.
"""
import glob
import importlib.util
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _has_extension(package_dir: str) -> bool:
    return bool(glob.glob(os.path.join(package_dir, "_C*.so"))
                or glob.glob(os.path.join(package_dir, "_C*.pyd")))


def _is_root(entry: str) -> bool:
    # "" on sys.path is the current directory.
    return os.path.realpath(entry or os.getcwd()) == os.path.realpath(ROOT)


def use_built_mpncov() -> None:
    """Make `import mpncov` find a package with its compiled extension, or exit saying why
    there is none."""
    if "mpncov" in sys.modules or _has_extension(os.path.join(ROOT, "mpncov")):
        return
    saved = sys.path[:]
    sys.path[:] = [e for e in saved if not _is_root(e)]
    spec = importlib.util.find_spec("mpncov")   # also asks editable-install finders
    installed = os.path.dirname(spec.origin) if spec and spec.origin else None
    if installed is None or not _has_extension(installed):
        sys.path[:] = saved
        sys.exit(f"error: {ROOT}/mpncov has no built extension (mpncov._C) and no installed "
                 "mpncov with one was found. Build it in place with\n"
                 "  pip install --no-build-isolation -e .\n"
                 "or install it (pip install .) and run `mpncov-bench`.")
    print(f"note: the source tree's mpncov/ has no built extension; using the installed "
          f"mpncov in {installed} (`mpncov-bench` runs it from any directory)", file=sys.stderr)
