"""PEP 517 hooks of mpncov: compile against the torch of the interpreter that runs pip.

pyproject.toml names this module as the build backend (backend-path = build_backend). The
hooks run setuptools' own (setuptools.build_meta, which executes setup.py) in one of two
places:

* here, in the hook's process, when torch is importable in it: `pip install
  --no-build-isolation .` (or `-e .`), where the hook runs in the user's environment;
* in a child process of the same interpreter when pip's build isolation hides torch (plain
  `pip install .` / `-e .`): the child runs without pip's isolation variables and with the
  isolated build environment's setuptools ahead of the user's site-packages
  (build_isolation.py says why); it runs this module as a script, so in the child torch is
  importable and the hook runs "here" (`python -m mpncov_build.backend`, BACKEND_DIR on the
  child's PYTHONPATH).

Where the hook runs "here" but setuptools cannot write wheels (setuptools older than 70.1
without the `wheel` package, as in a fresh Python 3.11 venv, or older than 64 for editable
wheels), wheel_writer.py builds the wheel with setuptools' build commands and writes it with
the standard library instead.

torch is never a build requirement (an isolated build would download one): the
get_requires hooks only check that a torch to build against exists, and say how to install
one when it does not.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import subprocess
import sys
import tempfile

from mpncov_build import build_isolation, torch_requirement, wheel_writer

#: The directory that holds this package (pyproject.toml's backend-path).
BACKEND_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_WHEEL_HOOKS = {
    "prepare_metadata_for_build_wheel": False, "build_wheel": False,
    "prepare_metadata_for_build_editable": True, "build_editable": True,
}


# ------------------------------------------------------------------------- where torch is

def _torch_here() -> bool:
    return importlib.util.find_spec("torch") is not None


def _torch_version():
    """The version of the torch to build against, None when there is none.

    In the hook's process when torch is importable there; otherwise, inside pip's build
    isolation, the one a child process of this interpreter without the isolation sees.
    """
    if _torch_here():
        try:
            return importlib.metadata.version("torch")
        except importlib.metadata.PackageNotFoundError:  # a torch without metadata
            return "unknown"
    if build_isolation.is_isolated(os.environ):
        return build_isolation.user_torch()["torch"]
    return None


def _require_torch() -> None:
    """Exit with a clear message when there is no torch to build against, or an old one."""
    version = _torch_version()
    if version is None:
        raise SystemExit(torch_requirement.missing_torch_message(sys.executable))
    if version != "unknown" and not torch_requirement.is_supported(version):
        raise SystemExit(torch_requirement.old_torch_message(sys.executable, version))


def _child_environment() -> dict:
    user = build_isolation.user_torch()
    build_dirs = build_isolation.build_env_dirs(sys.path, user["sys_path"])
    print(f"mpncov build backend: pip's build isolation hides torch; building in a child process "
          f"of {sys.executable}, which has torch {user['torch']}, with the build tools of "
          f"{os.pathsep.join(build_dirs) or 'its own environment'}", file=sys.stderr)
    return build_isolation.child_environment(os.environ, [BACKEND_DIR], build_dirs)


# ----------------------------------------------------------------------- running a hook

def _setuptools_writes_wheels(editable: bool) -> bool:
    """Whether this process's setuptools can write (editable) wheels by itself."""
    try:
        import setuptools  # noqa: F401  (newer ones put their vendored `wheel` on sys.path)
        from setuptools import build_meta
        from setuptools.dist import Distribution

        Distribution().get_command_class("bdist_wheel")
        import wheel.wheelfile  # noqa: F401
    except Exception:  # ImportError, or distutils' "invalid command 'bdist_wheel'"
        return False
    return not editable or hasattr(build_meta, "build_editable")


def _run_here(hook: str, kwargs: dict):
    if hook in _WHEEL_HOOKS and not _setuptools_writes_wheels(_WHEEL_HOOKS[hook]):
        return getattr(wheel_writer, hook)(**kwargs)
    from setuptools import build_meta
    return getattr(build_meta, hook)(**kwargs)


def _run_in_child(hook: str, kwargs: dict):
    with tempfile.TemporaryDirectory(prefix="mpncov-build-") as tmp:
        request, response = os.path.join(tmp, "request.json"), os.path.join(tmp, "response.json")
        with open(request, "w") as f:
            json.dump({"hook": hook, "kwargs": kwargs}, f)
        cmd = [sys.executable, "-m", "mpncov_build.backend", request, response]
        done = subprocess.run(cmd, env=_child_environment())
        if done.returncode != 0:
            raise SystemExit(f"mpncov: {hook} failed in the build process that sees the installed "
                             f"torch (exit code {done.returncode}; its output is above)")
        with open(response) as f:
            return json.load(f)["result"]


def _dispatch(hook: str, **kwargs):
    _require_torch()
    if _torch_here():
        return _run_here(hook, kwargs)
    return _run_in_child(hook, kwargs)


# -------------------------------------------------------------------------- PEP 517/660

def get_requires_for_build_wheel(config_settings=None):
    _require_torch()
    return []


def get_requires_for_build_editable(config_settings=None):
    _require_torch()
    return []


def get_requires_for_build_sdist(config_settings=None):
    _require_torch()
    return []


def prepare_metadata_for_build_wheel(metadata_directory, config_settings=None):
    return _dispatch("prepare_metadata_for_build_wheel", metadata_directory=metadata_directory,
                     config_settings=config_settings)


def prepare_metadata_for_build_editable(metadata_directory, config_settings=None):
    return _dispatch("prepare_metadata_for_build_editable", metadata_directory=metadata_directory,
                     config_settings=config_settings)


def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    return _dispatch("build_wheel", wheel_directory=wheel_directory,
                     config_settings=config_settings, metadata_directory=metadata_directory)


def build_editable(wheel_directory, config_settings=None, metadata_directory=None):
    return _dispatch("build_editable", wheel_directory=wheel_directory,
                     config_settings=config_settings, metadata_directory=metadata_directory)


def build_sdist(sdist_directory, config_settings=None):
    return _dispatch("build_sdist", sdist_directory=sdist_directory,
                     config_settings=config_settings)


def _child_main(request_path: str, response_path: str) -> None:
    """In the child: run the requested hook here (torch is importable) and write its result."""
    with open(request_path) as f:
        request = json.load(f)
    if not _torch_here():  # the parent checked: this would be a bug in the environment logic
        raise SystemExit(torch_requirement.missing_torch_message(sys.executable))
    result = _run_here(request["hook"], request["kwargs"])
    with open(response_path, "w") as f:
        json.dump({"result": result}, f)


if __name__ == "__main__":
    _child_main(*sys.argv[1:])
