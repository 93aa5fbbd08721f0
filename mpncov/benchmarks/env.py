"""What machine and build a benchmark ran on (the "env" block of results.json), and the
output folder name derived from them."""
from __future__ import annotations

import datetime as _dt
import os
import platform
import re
import shlex
import sys

import torch


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown-cpu"


def _mpncov_info() -> dict:
    """mpncov's version, location, build record and registered operators."""
    import mpncov
    from mpncov import info, ops

    return {
        "importable": True,
        "version": mpncov.__version__,
        "path": os.path.dirname(mpncov.__file__),
        "build_config": _jsonable(info.build_config()),
        "torch_ops": [op for op in ops.OPS if hasattr(torch.ops.mpncov, op)],
    }


def _jsonable(v):
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    return str(v)


def command_line(prog: str, argv) -> str:
    """The command as it could be typed again: `prog` (e.g. "python -m mpncov.benchmarks")
    and the arguments, shell-quoted."""
    return " ".join([prog, *(shlex.quote(a) for a in argv)])


def collect(device: torch.device, threads: int, command: str, argv) -> dict:
    """The env block: the command and its arguments, date, versions, machine, build."""
    env = {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "argv": list(argv),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "hostname": platform.node(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "device": str(device),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "threads": threads,
        "torch_num_threads": torch.get_num_threads(),
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "mpncov": _mpncov_info(),
    }
    try:
        env["loadavg_start"] = [round(v, 2) for v in os.getloadavg()]
    except OSError:
        env["loadavg_start"] = None
    try:
        import numpy
        env["numpy"] = numpy.__version__
    except ImportError:
        env["numpy"] = None
    try:
        import matplotlib
        env["matplotlib"] = matplotlib.__version__
    except ImportError:
        env["matplotlib"] = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update({
            "gpu_name": props.name,
            "gpu_memory_gib": round(props.total_memory / 2**30, 1),
            "gpu_sm_count": props.multi_processor_count,
            "gpu_capability": f"{props.major}.{props.minor}",
            "cudnn": torch.backends.cudnn.version(),
            "allow_tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
            "allow_tf32_cudnn": torch.backends.cudnn.allow_tf32,
            "driver": _nvidia_driver(),
        })
    return env


def _nvidia_driver():
    try:
        with open("/proc/driver/nvidia/version") as f:
            m = re.search(r"Kernel Module\s+(\S+)", f.read())
            return m.group(1) if m else None
    except OSError:
        return None


def device_tag(device: torch.device, threads: int) -> str:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"cpu-{cpu_model()}-{threads}t"
    tag = re.sub(r"\(r\)|\(tm\)|cpu @.*?(?=-\d+t$)|@ [\d.]+ghz", "", name.lower())
    tag = re.sub(r"[^a-z0-9]+", "-", tag).strip("-")
    return tag or device.type
