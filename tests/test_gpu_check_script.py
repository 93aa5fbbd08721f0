"""scripts/gpu_check.sh in its dry-run mode (no GPU needed): every step runs or is
recorded, the files it leaves are the at most 8 a device call can bring back."""
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
EXPECTED = {"summary.txt", "build.log", "smoke.log", "sanitizer.log", "pytest-cuda.log",
            "bench.log", "bench.json", "profile.log"}


@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                    reason="needs bash and coreutils timeout")
def test_gpu_check_dry_run(tmp_path):
    env = dict(os.environ, DRY_RUN="1", PYTHON=sys.executable)
    res = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), str(tmp_path)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    summary = (tmp_path / "summary.txt").read_text()
    assert res.returncode == 0, res.stdout + res.stderr
    assert {p.name for p in tmp_path.iterdir()} == EXPECTED
    for step in ("build", "info", "smoke", "sanitizer-memcheck", "sanitizer-racecheck",
                 "sanitizer-synccheck", "pytest-cuda", "bench-kernels", "profile"):
        assert any(line.startswith(step + " ") for line in summary.splitlines()), step
    assert "gpu_check: all steps passed" in summary
    assert "gpu_smoke: all passed" in (tmp_path / "smoke.log").read_text()
    assert '"variants"' in (tmp_path / "bench.json").read_text()
