"""Wheels and editable wheels written with the standard library.

For an environment whose setuptools builds but cannot write wheels: setuptools older than
70.1 without the `wheel` package (a fresh Python 3.11 venv has setuptools 65 and no `wheel`:
"invalid command 'bdist_wheel'"), or older than 64 for editable wheels (PEP 660). setup.py's
own commands still do the work (egg_info for the metadata, build or build_ext --inplace for
the code); this module only turns their output into a wheel (PEP 427):

* the .dist-info directory: METADATA from egg_info's PKG-INFO, with Requires-Dist lines from
  its requires.txt when PKG-INFO has none (setuptools before 68 leaves them out), WHEEL with
  the tag of this interpreter, entry_points.txt, top_level.txt, and RECORD (sha256 of every
  file);
* a wheel: the packages as `setup.py build` laid them out, extension included;
* an editable wheel: the extension is built in place in the source tree, and the wheel holds
  a .pth file whose import line installs a finder that maps each top-level package to the
  source tree (only those packages: the repository root is not put on sys.path).
"""
from __future__ import annotations

import base64
import hashlib
import os
import re
import subprocess
import sys
import sysconfig
import tempfile
import zipfile


# ------------------------------------------------------------------------ setup.py's work

def _setup(*args: str) -> None:
    """Run setup.py (in the current directory, the project root) with this interpreter."""
    subprocess.run([sys.executable, "setup.py", *args], check=True)


def _egg_info(tmp: str, *then: str) -> str:
    """Run egg_info into `tmp` (then the setup.py commands `then`); return the .egg-info path."""
    base = os.path.join(tmp, "egg-info")
    os.makedirs(base)
    _setup("egg_info", "--egg-base", base, *then)
    found = [d for d in os.listdir(base) if d.endswith(".egg-info")]
    if len(found) != 1:
        raise RuntimeError(f"setup.py egg_info wrote {found} in {base}, expected one .egg-info")
    return os.path.join(base, found[0])


# ---------------------------------------------------------------------------- metadata

def _headers_and_body(text: str):
    """PKG-INFO's header lines, and its body (the long description, after a blank line)."""
    head, _, body = text.partition("\n\n")
    return head.rstrip("\n").split("\n"), body


def requires_dist(requires_txt: str) -> list:
    """Requires-Dist values from an egg-info requires.txt ([extra], [:marker], [extra:marker])."""
    out, extra, marker = [], "", ""
    for line in requires_txt.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        section = re.fullmatch(r"\[([^:\]]*)(?::(.*))?\]", line)
        if section:
            extra, marker = section.group(1).strip(), (section.group(2) or "").strip()
            continue
        conditions = []
        if marker:
            conditions.append(f"({marker})" if extra else marker)
        if extra:
            conditions.append(f'extra == "{extra}"')
        out.append(line + ("; " + " and ".join(conditions) if conditions else ""))
    return out


def metadata_text(pkg_info: str, requires_txt: str) -> str:
    """Core metadata for the wheel: PKG-INFO, plus Requires-Dist when PKG-INFO has none."""
    headers, body = _headers_and_body(pkg_info)
    if not any(h.startswith("Requires-Dist:") for h in headers):
        headers += [f"Requires-Dist: {r}" for r in requires_dist(requires_txt)]
    return "\n".join(headers) + "\n" + ("\n" + body if body.strip() else "")


def _field(pkg_info: str, name: str) -> str:
    for line in _headers_and_body(pkg_info)[0]:
        if line.startswith(name + ":"):
            return line.split(":", 1)[1].strip()
    raise RuntimeError(f"PKG-INFO has no {name} field")


def wheel_tag() -> str:
    """python-abi-platform tag of this interpreter, e.g. cp311-cp311-linux_x86_64."""
    if sys.implementation.name != "cpython":
        raise RuntimeError(f"mpncov's wheel writer supports CPython only, not {sys.implementation.name}")
    python = f"cp{sys.version_info[0]}{sys.version_info[1]}"
    soabi = sysconfig.get_config_var("SOABI") or ""  # cpython-311-x86_64-linux-gnu, cpython-313t-...
    abi = "cp" + soabi.split("-")[1] if soabi.startswith("cpython-") else python
    platform = re.sub(r"[-.]", "_", sysconfig.get_platform())
    return f"{python}-{abi}-{platform}"


def _write_dist_info(egg_info: str, target: str) -> str:
    """Write NAME-VERSION.dist-info under `target` (without RECORD); return its name."""
    def read(name):
        path = os.path.join(egg_info, name)
        return open(path, encoding="utf-8").read() if os.path.exists(path) else ""

    pkg_info = read("PKG-INFO")
    name = re.sub(r"[-_.]+", "_", _field(pkg_info, "Name"))
    version = _field(pkg_info, "Version").replace("-", "_")
    dist_info = f"{name}-{version}.dist-info"
    out = os.path.join(target, dist_info)
    os.makedirs(out)
    files = {
        "METADATA": metadata_text(pkg_info, read("requires.txt")),
        "WHEEL": ("Wheel-Version: 1.0\nGenerator: mpncov_build.wheel_writer\n"
                  f"Root-Is-Purelib: false\nTag: {wheel_tag()}\n"),
        "entry_points.txt": read("entry_points.txt"),
        "top_level.txt": read("top_level.txt"),
    }
    for fname, text in files.items():
        if text:
            with open(os.path.join(out, fname), "w", encoding="utf-8") as f:
                f.write(text)
    return dist_info


# -------------------------------------------------------------------------- the archive

def _record_hash(data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"sha256={digest}"


def _zip_tree(root: str, dist_info: str, wheel_path: str) -> None:
    """Zip every file under `root` into a wheel, with RECORD (written last) listing them."""
    members = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")
        for fname in sorted(files):
            path = os.path.join(folder, fname)
            members.append((path, os.path.relpath(path, root).replace(os.sep, "/")))
    record_name = f"{dist_info}/RECORD"
    lines = []
    with zipfile.ZipFile(wheel_path, "w", zipfile.ZIP_DEFLATED) as zf:
        for path, arcname in members:
            with open(path, "rb") as f:
                data = f.read()
            zf.write(path, arcname)
            lines.append(f"{arcname},{_record_hash(data)},{len(data)}")
        lines.append(f"{record_name},,")
        zf.writestr(record_name, "\n".join(lines) + "\n")


def _wheel_name(dist_info: str) -> str:
    return dist_info[:-len(".dist-info")] + f"-{wheel_tag()}.whl"


# ------------------------------------------------------------------- PEP 517/660 hooks

def prepare_metadata_for_build_wheel(metadata_directory, config_settings=None):
    with tempfile.TemporaryDirectory(prefix="mpncov-wheel-") as tmp:
        return _write_dist_info(_egg_info(tmp), metadata_directory)


prepare_metadata_for_build_editable = prepare_metadata_for_build_wheel


def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    """Build with `setup.py build` into a staging tree and zip it with its metadata."""
    with tempfile.TemporaryDirectory(prefix="mpncov-wheel-") as tmp:
        stage = os.path.join(tmp, "stage")
        egg_info = _egg_info(tmp, "build", "--build-lib", stage, "--build-temp", os.path.join(tmp, "temp"))
        dist_info = _write_dist_info(egg_info, stage)
        wheel = _wheel_name(dist_info)
        _zip_tree(stage, dist_info, os.path.join(wheel_directory, wheel))
    return wheel


_FINDER = '''\
"""Editable install of {project} (written by mpncov_build.wheel_writer): these top-level
packages are imported from the source tree that `pip install -e` was run in."""
import sys
from importlib.machinery import PathFinder

SOURCES = {sources!r}  # top-level package -> the directory that holds it


class EditableFinder:
    @classmethod
    def find_spec(cls, fullname, path=None, target=None):
        if fullname in SOURCES:
            return PathFinder.find_spec(fullname, [SOURCES[fullname]])
        return None


def install():
    if not any(getattr(f, "__module__", None) == __name__ for f in sys.meta_path):
        sys.meta_path.append(EditableFinder)
'''


def build_editable(wheel_directory, config_settings=None, metadata_directory=None):
    """Build the extension in place; the wheel maps the top-level packages to the source tree."""
    root = os.getcwd()
    with tempfile.TemporaryDirectory(prefix="mpncov-wheel-") as tmp:
        egg_info = _egg_info(tmp, "build_ext", "--inplace", "--build-temp", os.path.join(tmp, "temp"))
        stage = os.path.join(tmp, "stage")
        os.makedirs(stage)
        dist_info = _write_dist_info(egg_info, stage)
        project = dist_info[:-len(".dist-info")]
        with open(os.path.join(stage, dist_info, "top_level.txt")) as f:
            packages = [line.strip() for line in f if line.strip()]
        finder = f"__editable___{project.replace('-', '_').replace('.', '_')}_finder"
        with open(os.path.join(stage, finder + ".py"), "w") as f:
            f.write(_FINDER.format(project=project, sources={p: root for p in packages}))
        with open(os.path.join(stage, f"__editable__.{project}.pth"), "w") as f:
            f.write(f"import {finder}; {finder}.install()\n")
        wheel = _wheel_name(dist_info)
        _zip_tree(stage, dist_info, os.path.join(wheel_directory, wheel))
    return wheel
