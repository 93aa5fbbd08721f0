"""Which CUDA toolkit the CUDA kernels are compiled with.

torch.utils.cpp_extension takes CUDA_HOME, else CUDA_PATH, else two directories above `nvcc`
on PATH. Where that nvcc is a wrapper script (/usr/local/bin/nvcc running
/usr/local/cuda-13.0/bin/nvcc) torch guesses /usr/local and the build fails with
"cuda_runtime.h: No such file". A toolkit here is a directory that really has
include/cuda_runtime.h; the first of these is used (setup.py puts it in CUDA_HOME before
torch.utils.cpp_extension reads it, and prints it with the reason):

1. CUDA_HOME, then CUDA_PATH, when set and valid;
2. the toolkit of `nvcc` on PATH: two directories above its real path (symbolic links
   resolved), else the TOP directory nvcc reports for itself (`nvcc --dryrun`), which sees
   through wrapper scripts;
3. /usr/local/cuda.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess

DEFAULT_LOCATION = "/usr/local/cuda"


def is_toolkit(root) -> bool:
    return bool(root) and os.path.isfile(os.path.join(root, "include", "cuda_runtime.h"))


def nvcc_reported_root(nvcc: str):
    """The toolkit directory nvcc itself reports (`#$ TOP=...` of a dry run), or None."""
    try:
        out = subprocess.run([nvcc, "--dryrun", "-E", "-x", "cu", os.devnull],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    top = re.search(r"^#\$ TOP=(.+)$", out, re.MULTILINE)
    return os.path.normpath(top.group(1).strip()) if top else None


def find(environ=os.environ, which=shutil.which, ask_nvcc=nvcc_reported_root):
    """(toolkit root, why) of the first valid candidate, or (None, what was tried).

    `why` also names the candidates passed over (e.g. a CUDA_HOME without the headers).
    """
    tried = []

    def found(root, why):
        return root, "; ".join(tried + [why])

    for var in ("CUDA_HOME", "CUDA_PATH"):
        value = environ.get(var)
        if value:
            if is_toolkit(value):
                return found(value, f"from {var}")
            tried.append(f"{var}={value} has no include/cuda_runtime.h")
    nvcc = which("nvcc", path=environ.get("PATH"))
    if nvcc:
        real = os.path.realpath(nvcc)
        above = os.path.dirname(os.path.dirname(real))
        if is_toolkit(above):
            return found(above, f"nvcc on PATH: {nvcc}" + ("" if real == nvcc else f" -> {real}"))
        reported = ask_nvcc(nvcc)
        if is_toolkit(reported):
            return found(reported, f"nvcc on PATH ({nvcc}, a wrapper) reports its toolkit at {reported}")
        tried.append(f"nvcc on PATH ({nvcc}): neither {above} nor the toolkit it reports "
                     f"({reported}) has include/cuda_runtime.h")
    else:
        tried.append("no nvcc on PATH")
    if is_toolkit(DEFAULT_LOCATION):
        return found(DEFAULT_LOCATION, "the default location")
    tried.append(f"{DEFAULT_LOCATION} has no include/cuda_runtime.h")
    return None, "; ".join(tried)


if __name__ == "__main__":  # print the toolkit's root (for scripts), or exit 1 saying what was tried
    import sys

    found, why = find()
    if found is None:
        sys.exit(f"no CUDA toolkit found: {why}")
    print(found)
