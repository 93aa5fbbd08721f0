"""What machine and build a benchmark ran on (the "env" block of results.json)."""
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
    """mpncov version / build flags, via mpncov.info if it offers a function for it."""
    out: dict = {}
    try:
        import mpncov
    except Exception as e:  # extension not built
        return {"importable": False, "error": f"{type(e).__name__}: {e}"}
    out["importable"] = True
    out["version"] = getattr(mpncov, "__version__", None)
    out["path"] = os.path.dirname(getattr(mpncov, "__file__", "") or "")
    try:
        import mpncov.info as info_mod
        for fname in ("info", "get_info", "build_info", "collect", "collect_info", "as_dict"):
            fn = getattr(info_mod, fname, None)
            if callable(fn):
                try:
                    res = fn()
                except TypeError:
                    continue
                if isinstance(res, dict):
                    out["info"] = _jsonable(res)
                    break
                if isinstance(res, str):
                    out["info"] = res
                    break
    except Exception as e:
        out["info_error"] = f"{type(e).__name__}: {e}"
    try:
        import mpncov._build_config as bc
        out["build_config"] = {k: _jsonable(getattr(bc, k)) for k in dir(bc) if k.isupper()}
    except Exception:
        pass
    try:
        ns = torch.ops.mpncov
        names = []
        for op in ("covpool", "covpool_backward", "sqrtm", "sqrtm_backward", "triuvec",
                   "triuvec_backward", "isqrt_cov", "isqrt_cov_backward"):
            try:
                getattr(ns, op)
                names.append(op)
            except (AttributeError, RuntimeError):
                pass
        out["torch_ops"] = names
    except Exception:
        pass
    return out


def _jsonable(v):
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    return str(v)


def collect(device: torch.device, threads: int, argv=None) -> dict:
    argv = sys.argv if argv is None else argv
    env = {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(shlex.quote(a) for a in [os.path.basename(sys.executable), "-m",
                                                      "benchmarks.run", *argv[1:]]),
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
