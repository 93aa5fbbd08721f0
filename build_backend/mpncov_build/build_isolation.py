"""pip's build isolation, and a child process that sees the torch of the interpreter running pip.

pip runs a backend's hooks with the interpreter that runs pip (sys.executable), isolated by
two environment variables: PYTHONPATH names a directory whose sitecustomize.py removes that
interpreter's site-packages from sys.path and adds the isolated build environment (where pip
installed pyproject.toml's build requirements), and PYTHONNOUSERSITE=1 hides the user site.
So torch, which mpncov must compile against and which is deliberately not a build
requirement (pip would download one), is hidden from the hooks.

A child process of sys.executable without those two variables sees the interpreter's own
site-packages again, and with them the installed torch. The build environment's package
directories go on the child's PYTHONPATH, which Python puts *before* site-packages: the build
tools pip installed for this build (a setuptools that writes wheels and editable wheels) are
the ones used, not an older setuptools the user's environment may have (a fresh Python 3.11
venv has setuptools 65 and no `wheel`); torch and its dependencies, which the build
environment lacks, come from the user's site-packages.
"""
from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
import sysconfig

#: Run in the child with the cleaned environment: its sys.path and the torch it can import.
_PROBE = """\
import importlib.metadata, importlib.util, json, sys
torch = None
if importlib.util.find_spec("torch") is not None:
    try:
        torch = importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        torch = "unknown"
print(json.dumps({"sys_path": sys.path, "torch": torch}))
"""


def isolation_dirs(environ) -> list:
    """PYTHONPATH entries that hide site-packages: pip's sitecustomize.py directory."""
    entries = [p for p in environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return [p for p in entries if os.path.isfile(os.path.join(p, "sitecustomize.py"))]


def is_isolated(environ) -> bool:
    return bool(isolation_dirs(environ))


def without_isolation(environ) -> dict:
    """`environ` minus pip's isolation: its sitecustomize directory and PYTHONNOUSERSITE.

    Only what pip's isolation set is removed: without a sitecustomize directory on
    PYTHONPATH (no isolation, e.g. --no-build-isolation) the environment is kept as it is.
    """
    env = dict(environ)
    hiding = isolation_dirs(environ)
    if not hiding:
        return env
    rest = [p for p in environ.get("PYTHONPATH", "").split(os.pathsep) if p and p not in hiding]
    if rest:
        env["PYTHONPATH"] = os.pathsep.join(rest)
    else:
        env.pop("PYTHONPATH", None)
    env.pop("PYTHONNOUSERSITE", None)
    return env


def build_env_dirs(hook_sys_path, child_sys_path) -> list:
    """The build environment's package directories: on the hook's sys.path, not on the child's.

    Only directories that hold installed distributions (*.dist-info) count, which leaves out
    the backend's own directory and pip's hook runner on the hook's sys.path.
    """
    seen = {os.path.normcase(os.path.abspath(p)) for p in child_sys_path if p}
    dirs = []
    for p in hook_sys_path:
        if not p or os.path.normcase(os.path.abspath(p)) in seen or p in dirs:
            continue
        if glob.glob(os.path.join(glob.escape(p), "*.dist-info")):
            dirs.append(p)
    return dirs


def child_environment(environ, front, build_dirs) -> dict:
    """The environment of the child process that builds: no isolation, `front` then the build
    environment's directories on PYTHONPATH, and the interpreter's scripts directory (ninja of
    an unactivated venv) at the end of PATH."""
    env = without_isolation(environ)
    rest = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join([*front, *build_dirs, *rest])
    scripts = sysconfig.get_path("scripts")
    path = env.get("PATH", "").split(os.pathsep)
    if scripts and scripts not in path:
        env["PATH"] = os.pathsep.join([*[p for p in path if p], scripts])
    return env


def probe(python: str, env) -> dict:
    """sys.path of `python` under `env`, and the version of the torch it can import (or None)."""
    out = subprocess.run([python, "-c", _PROBE], env=env, check=True, stdout=subprocess.PIPE,
                         text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def user_torch(python: str = sys.executable, environ=os.environ) -> dict:
    """What a child of `python` without pip's isolation sees: {"sys_path": [...], "torch": version or None}."""
    return probe(python, without_isolation(environ))
