"""The benchmark baselines compute the same thing as mpncov, and the benchmark
(mpncov.benchmarks) works end to end: in-process, as `python -m mpncov.benchmarks` from
another directory, and through the repository root's `python -m benchmarks.run`."""
import csv
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import mpncov
from mpncov.benchmarks import baselines, cli, config, flops, output, plot, profile_kernels, sweep

DT = torch.float64
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The directory that holds the mpncov package this test process imported: subprocesses
# get it on PYTHONPATH, so they run the same build wherever their working directory is.
MPNCOV_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(mpncov.__file__)))
SMOKE_FAST = ["--smoke", "--device", "cpu", "--threads", "1", "--min-run-time", "0.002",
              "--min-reps", "2"]


def _impls(with_mpncov=True):
    out = [baselines.get_impl("published"), baselines.get_impl("autograd")]
    if with_mpncov:
        out.append(baselines.get_impl("mpncov"))
    return out


def _x(B=3, C=6, M=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, C, M, generator=g, dtype=DT).requires_grad_(True)


def _spd(B=3, C=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(B, C, 2 * C, generator=g, dtype=DT)
    s = a @ a.transpose(1, 2) / (2 * C)
    return ((s + s.transpose(1, 2)) / 2).requires_grad_(True)  # exactly symmetric


def _fwd_grad(fn, inp, seed=2):
    out = fn(inp)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    (grad,) = torch.autograd.grad(out, inp, g)   # non-symmetric incoming gradient
    return out.detach(), grad


def _assert_all_close(results, rtol=1e-9, atol=1e-11):
    (name0, (o0, g0)), rest = results[0], results[1:]
    for name, (o, g) in rest:
        torch.testing.assert_close(o, o0, rtol=rtol, atol=atol, msg=f"forward {name} vs {name0}")
        torch.testing.assert_close(g, g0, rtol=rtol, atol=atol, msg=f"gradient {name} vs {name0}")


@pytest.mark.parametrize("with_mpncov", [False, True])
def test_covpool_agree(with_mpncov):
    x = _x()
    _assert_all_close([(i.name, _fwd_grad(i.covpool, x)) for i in _impls(with_mpncov)])


def test_covpool_4d_input():
    x = _x(M=12).detach().reshape(3, 6, 3, 4).requires_grad_(True)
    res = [(i.name, _fwd_grad(i.covpool, x)) for i in _impls(False)]
    _assert_all_close(res)
    assert res[0][1][1].shape == x.shape


@pytest.mark.parametrize("iters", [1, 2, 3, 5])
def test_sqrtm_agree(iters):
    s = _spd()
    # mpncov.sqrtm is defined on the symmetric part of its input, so its gradient is the
    # symmetric part of the baselines' (which differentiate S as given).
    results = []
    for i in _impls():
        out, grad = _fwd_grad(lambda t: i.sqrtm(t, iters), s)
        results.append((i.name, (out, (grad + grad.transpose(1, 2)) / 2)))
    _assert_all_close(results)


def test_triuvec_agree():
    s = _spd()
    res = [(i.name, _fwd_grad(i.triuvec, s)) for i in _impls()]
    _assert_all_close(res, rtol=0, atol=0)
    assert res[0][1][0].shape == (3, 21)
    # row-major upper triangle including the diagonal
    assert torch.equal(res[0][1][0][0, :6], s.detach()[0, 0, :])


@pytest.mark.parametrize("iters", [3, 5])
def test_pipeline_agree(iters):
    x = _x()
    _assert_all_close([(i.name, _fwd_grad(lambda t: i.pipeline(t, iters), x))
                       for i in _impls(with_mpncov=True)], rtol=1e-8, atol=1e-10)


def test_published_gradcheck():
    pub = baselines.get_impl("published")
    s = _spd(B=2, C=4)
    x = _x(B=2, C=4, M=7)
    for n in (1, 2, 4):
        assert torch.autograd.gradcheck(lambda t: pub.sqrtm(t, n), (s,))
    assert torch.autograd.gradcheck(pub.covpool, (x,))
    assert torch.autograd.gradcheck(pub.triuvec, (s,))


def _sym(g):
    return (g + g.transpose(1, 2)) / 2


def test_eigh_matches_converged_iteration():
    # eigh is the exact root; the recurrence converges to it with many iterations. eigh
    # reads one triangle and returns a symmetric gradient, so for sqrtm only the symmetric
    # parts (the derivative along symmetric directions) are comparable; the pipeline's
    # covpool backward symmetrises anyway.
    s = _spd(C=5)      # full rank: distinct eigenvalues
    eigh = baselines.get_impl("eigh")
    ag = baselines.get_impl("autograd")
    o_e, g_e = _fwd_grad(eigh.sqrtm, s)
    o_a, g_a = _fwd_grad(lambda t: ag.sqrtm(t, 30), s)
    torch.testing.assert_close(o_e, o_a, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(_sym(g_e), _sym(g_a), rtol=1e-4, atol=1e-6)
    x = _x(C=5, M=20)
    o_e, g_e = _fwd_grad(eigh.pipeline, x)
    o_a, g_a = _fwd_grad(lambda t: ag.pipeline(t, 30), x)
    torch.testing.assert_close(o_e, o_a, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(g_e, g_a, rtol=1e-4, atol=1e-6)
    mp = baselines.get_impl("mpncov")
    o_m, g_m = _fwd_grad(lambda t: mp.pipeline(t, 30), x)
    torch.testing.assert_close(o_m, o_e, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(g_m, g_e, rtol=1e-4, atol=1e-6)
    o_m, g_m = _fwd_grad(lambda t: mp.sqrtm(t, 30), s)
    o_e, g_e = _fwd_grad(eigh.sqrtm, s)
    torch.testing.assert_close(o_m, o_e, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(_sym(g_m), _sym(g_e), rtol=1e-4, atol=1e-6)


def test_flop_model():
    f, b = flops.flops("sqrtm", {"B": 2, "C": 4, "N": 5})
    assert f == 2 * 12 * 2 * 4 ** 3 and b == 2 * 24 * 2 * 4 ** 3
    f, b = flops.flops("sqrtm", {"B": 1, "C": 4, "N": 1})
    assert f == 2 * 4 ** 3 and b == 2 * 2 * 4 ** 3
    f, b = flops.flops("covpool", {"B": 1, "C": 4, "M": 10})
    assert f == b == 2 * 16 * 10
    assert flops.flops("triuvec", {"B": 2, "C": 4}) == (0.0, 0.0)
    assert flops.gpu_peak(torch.device("cpu"), "fp32") == (None, None)
    assert flops.gpu_peak(torch.device("cpu"), "fp32", 12.5) == (12.5, "--peak-tflops")


def _configs(argv, device_type="cpu"):
    args, _ = cli.parse_args(argv)
    return args, config.build_configs(args.mode, args.ops, args.dtypes or ["fp32"],
                                      args.shape_list, device_type)


def test_shape_filter_and_preset_sets():
    args, cfgs = _configs(["--shapes", "B=4,C=8,M=16,N=3; B=2,C=8", "--ops", "sqrtm,pipeline"])
    assert args.mode == "shapes" and (args.min_run_time, args.min_reps, args.rounds) == (0.5, 5, 2)
    got = {(c.op, config.shape_str(c.op, c.shape)) for c in cfgs}
    assert got == {("sqrtm", "B=4,C=8,N=3"), ("pipeline", "B=4,C=8,M=16,N=3"),
                   ("sqrtm", "B=2,C=8,N=5"), ("pipeline", "B=2,C=8,M=196,N=5")}
    args, cfgs = _configs([])
    assert args.mode == "quick" and args.rounds == 3
    got = {(c.op, config.shape_str(c.op, c.shape)) for c in cfgs}
    for target in [("pipeline", "B=32,C=256,M=196,N=5"), ("pipeline", "B=64,C=64,M=196,N=3"),
                   ("covpool", "B=32,C=128,M=784")]:
        assert target in got
    _, cfgs = _configs([], device_type="cuda")
    assert {config.shape_str("pipeline", c.shape) for c in cfgs if c.op == "pipeline"} == \
        {"B=128,C=256,M=196,N=5", "B=128,C=128,M=784,N=3"}
    _, cfgs = _configs(["--full", "--ops", "triuvec", "--dtypes", "fp32,bf16"])
    assert len(cfgs) == 2 * 3 * 2 and {c.dtype for c in cfgs} == {"fp32", "bf16"}
    args, cfgs = _configs(["--networks"])
    assert args.mode == "networks" and cfgs == []
    args, _ = _configs(["--networks", "--quick"])
    assert args.mode == "quick" and args.networks
    _, cfgs = _configs(["--smoke", "--rounds", "4", "--ops", "pipeline,covpool"])
    assert [c.op for c in cfgs] == ["covpool", "pipeline"]      # in OPS order


@pytest.mark.parametrize("text, names", [
    ("B=4,C=x", "C='x'"), ("B=4,C=0", "C=0"), ("B=4,K=3", "'K=3'"),
    ("C=8,M=16", "needs at least B and C"),
    (" ; ", "no shape"),
])
def test_bad_shapes_are_named(text, names, capsys):
    with pytest.raises(ValueError, match=names.replace("(", r"\(")):
        config.parse_shapes(text)
    with pytest.raises(SystemExit) as e:
        cli.parse_args(["--shapes", text])
    assert e.value.code == 2 and "--shapes" in capsys.readouterr().err


@pytest.mark.parametrize("argv, names", [
    (["--ops", "covpool,cov"], "unknown op 'cov'"),
    (["--impls", "mpncov,exact"], "unknown impl 'exact'"),
    (["--dtypes", "fp8"], "unknown dtype 'fp8'"),
    (["--rounds", "0"], "--rounds must be >= 1, got 0"),
    (["--threads", "-1"], "--threads must be >= 1"), (["--min-run-time", "0"], "--min-run-time"),
    (["--ops", ","], "no op given"),
])
def test_bad_options_are_named(argv, names, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2 and names in capsys.readouterr().err


def test_smoke_run_writes_outputs(tmp_path, capsys):
    impls = "mpncov,published,autograd,eigh"
    rc = cli.main(SMOKE_FAST + ["--impls", impls, "--out", str(tmp_path)])
    assert rc == 0
    captured = capsys.readouterr()
    assert "fwd+bwd ms" in captured.out
    # stderr is not a terminal here: one plain line per item, no carriage-return redraws
    assert "[0/14, " in captured.err and "] pipeline B=2,C=8,M=16,N=3 fp32 eigh" in captured.err
    assert "\r" not in captured.err
    doc = json.loads((tmp_path / "results.json").read_text())
    env = doc["env"]
    for key in ("cpu_model", "threads", "torch", "python", "command", "date_utc", "mpncov"):
        assert key in env
    assert env["command"].startswith("python -m mpncov.benchmarks --smoke --device cpu")
    assert env["mpncov"]["torch_ops"] and env["mpncov"]["version"] == mpncov.__version__
    assert doc["settings"]["mode"] == "smoke" and doc["settings"]["rounds"] == 1
    assert doc["flop_model"] == flops.SUMMARY
    rows = doc["results"]
    assert len(rows) == 4 * 3 + 2     # covpool, triuvec: 3 impls each; sqrtm, pipeline: 4
    for r in rows:
        assert r["error"] is None, r
        for k in ("fwd", "bwd", "fwdbwd"):
            assert r[k]["median_ms"] > 0 and r[k]["runs"] >= 2
        assert r["peak_mb"] >= 0 and r["grad_finite"]
        if r["impl"] not in ("mpncov", "eigh"):
            assert r["rel_diff_vs_mpncov"] < 1e-4
    for r in rows:
        if r["impl"] == "mpncov":
            want = {"published", "autograd"}
            if r["op"] in ("sqrtm", "pipeline"):
                want.add("eigh")
            assert set(r["speedup_fwdbwd"]) == want
    with open(tmp_path / "results.csv") as f:
        reader = csv.DictReader(f)
        csv_rows = list(reader)
    assert tuple(reader.fieldnames) == output.CSV_FIELDS
    assert len(csv_rows) == len(rows)
    assert all(float(r["fwdbwd_median_ms"]) > 0 for r in csv_rows)
    assert all(float(r["speedup_fwdbwd_vs_published"]) > 0
               for r in csv_rows if r["impl"] == "mpncov")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    for name in ("speedup_vs_C.png", "pipeline_split.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _run(args, cwd, python_flags=(), env_extra=None):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(env_extra or {})
    return subprocess.run([sys.executable, *python_flags, *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_module_runs_from_another_directory(tmp_path):
    # No --out: results go to benchmarks/results/<device tag>/ under the working directory.
    r = _run(["-m", "mpncov.benchmarks", *SMOKE_FAST, "--ops", "covpool",
              "--impls", "mpncov,autograd", "--no-plots"], cwd=tmp_path,
             env_extra={"PYTHONPATH": MPNCOV_PARENT})
    assert r.returncode == 0, r.stderr
    (out,) = (tmp_path / "benchmarks" / "results").iterdir()
    assert out.name.startswith("cpu-") and out.name.endswith("-1t")
    doc = json.loads((out / "results.json").read_text())
    assert [(x["op"], x["impl"]) for x in doc["results"]] == [("covpool", "mpncov"),
                                                             ("covpool", "autograd")]
    assert doc["env"]["command"] == "python -m mpncov.benchmarks " + " ".join(
        SMOKE_FAST + ["--ops", "covpool", "--impls", "mpncov,autograd", "--no-plots"])
    assert str(out) in r.stdout and not (tmp_path / "results.csv").exists()


def test_repository_root_commands():
    # Only meaningful in a source checkout that holds the convenience package.
    if not os.path.isfile(os.path.join(ROOT, "benchmarks", "run.py")):
        pytest.skip("no source checkout")
    r = _run(["-m", "benchmarks.run", "--smoke", "--ops", "covpool", "--dry-run"], cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["covpool", "B=2,C=8,M=16", "fp32", "mpncov,published,autograd"]
    r = _run(["-m", "benchmarks.profile_kernels", "--help"], cwd=ROOT)
    assert r.returncode == 0 and "--impl" in r.stdout, r.stderr


def _source_tree_without_extension(tmp_path):
    """A copy of the repository root's benchmarks/ next to an mpncov/ without _C."""
    root = tmp_path / "src"
    (root / "benchmarks").mkdir(parents=True)
    for name in ("__init__.py", "run.py"):
        shutil.copy(os.path.join(ROOT, "benchmarks", name), root / "benchmarks" / name)
    (root / "mpncov").mkdir()
    (root / "mpncov" / "__init__.py").write_text(
        'raise ImportError("the source tree was imported")\n')
    return root


def test_repository_root_command_uses_the_installed_package(tmp_path):
    if not os.path.isfile(os.path.join(ROOT, "benchmarks", "run.py")):
        pytest.skip("no source checkout")
    root = _source_tree_without_extension(tmp_path)
    r = _run(["-m", "benchmarks.run", "--smoke", "--ops", "triuvec", "--dry-run"], cwd=root,
             env_extra={"PYTHONPATH": MPNCOV_PARENT})
    assert r.returncode == 0, r.stderr
    assert "has no built extension; using the installed mpncov in" in r.stderr
    assert os.path.dirname(os.path.abspath(mpncov.__file__)) in r.stderr
    assert r.stdout.split()[:2] == ["triuvec", "B=2,C=8"]
    # Without any installed mpncov (-S: no site-packages): a clear error, not a traceback.
    r = _run(["-m", "benchmarks.run", "--smoke"], cwd=root, python_flags=["-S"])
    assert r.returncode == 1
    assert "has no built extension (mpncov._C) and no installed mpncov" in r.stderr
    assert "pip install --no-build-isolation -e ." in r.stderr and "Traceback" not in r.stderr


def test_plot_writes_png_when_matplotlib_present(tmp_path):
    pytest.importorskip("matplotlib")
    t = {"median_ms": 1.0, "iqr_ms": 0.1, "runs": 3}
    rows = []
    for c in (8, 16):
        for impl, ms in (("mpncov", 1.0), ("published", 3.0)):
            rows.append({"op": "pipeline", "shape": f"B=2,C={c},M=16,N=3", "B": 2, "C": c, "M": 16,
                         "N": 3, "dtype": "fp32", "impl": impl, "error": None,
                         "fwd": {**t, "median_ms": ms / 3}, "bwd": {**t, "median_ms": 2 * ms / 3},
                         "fwdbwd": {**t, "median_ms": ms}})
    sweep.add_speedups(rows)
    assert rows[0]["speedup_fwdbwd"] == {"published": 3.0}
    files = plot.make_plots(rows, tmp_path)
    assert {p.name for p in files} == {"speedup_vs_C.png", "pipeline_split.png"}
    for p in files:
        assert p.read_bytes()[:4] == b"\x89PNG"


def test_networks_section_tiny(tmp_path, capsys):
    names = ["resnet_tiny", "isqrt_cov_resnet_tiny"]
    rc = cli.main(["--networks", "--network-names", ",".join(names + ["no_such_model"]),
                   "--net-batch", "2", "--net-size", "32", "--threads", "1",
                   "--min-run-time", "0.002", "--min-reps", "2", "--out", str(tmp_path),
                   "--device", "cpu"])
    assert rc == 0
    doc = json.loads((tmp_path / "results.json").read_text())
    assert doc["results"] == [] and doc["settings"]["mode"] == "networks"
    nets = {r["network"]: r for r in doc["networks"]}
    for n in names:
        assert nets[n]["model"] == n and nets[n]["error"] is None and nets[n]["images_per_s"] > 0
    assert "unknown model 'no_such_model'" in nets["no_such_model"]["error"]
    assert any("no_such_model" in n for n in doc["notes"])
    with open(tmp_path / "networks.csv") as f:
        assert [r["network"] for r in csv.DictReader(f)] == names + ["no_such_model"]
    assert "isqrt_cov_resnet_tiny" in capsys.readouterr().out


@pytest.mark.parametrize("impl", ["mpncov", "published"])
def test_profile_kernels_smoke(tmp_path, capsys, impl):
    out = tmp_path / "profile.json"
    assert profile_kernels.main(["--device", "cpu", "--impl", impl, "--shape", "B=2,C=8,M=16,N=3",
                                 "--steps", "1", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["impl"] == impl and data["shape"] == {"B": 2, "C": 8, "M": 16, "N": 3}
    assert data["rows"] and abs(sum(r["share"] for r in data["rows"]) - 1) < 1e-6
    assert any("mpncov::" in r["name"] for r in data["rows"]) == (impl == "mpncov")
    assert "total ms per step" in capsys.readouterr().out


def test_profile_kernels_bad_shape(capsys):
    with pytest.raises(SystemExit) as e:
        profile_kernels.main(["--device", "cpu", "--shape", "B=2,C=eight"])
    assert e.value.code == 2 and "C='eight'" in capsys.readouterr().err


def test_smoke_run_times_both_spaces_side_by_side(tmp_path):
    fast = [a for a in SMOKE_FAST if a != "--smoke"] + ["--rounds", "1"]
    rc = cli.main(fast + ["--ops", "pipeline", "--impls", "mpncov,mpncov-cov,mpncov-gram,published",
                          "--out", str(tmp_path), "--shapes", "B=2,C=64,M=16,N=3", "--no-plots"])
    assert rc == 0
    rows = json.loads((tmp_path / "results.json").read_text())["results"]
    by_impl = {r["impl"]: r for r in rows}
    assert set(by_impl) == {"mpncov", "mpncov-cov", "mpncov-gram", "published"}
    assert by_impl["mpncov"]["space"] == mpncov._space.choose(64, 16, 3) == "gram"
    assert by_impl["mpncov-cov"]["space"] == "cov" and by_impl["mpncov-gram"]["space"] == "gram"
    assert by_impl["published"]["space"] is None
    for name in ("mpncov-cov", "mpncov-gram"):
        assert by_impl[name]["rel_diff_vs_mpncov"] < 1e-5 and by_impl[name]["saved_mb"] > 0
    assert set(by_impl["mpncov"]["speedup_fwdbwd"]) == {"mpncov-cov", "mpncov-gram", "published"}
    with open(tmp_path / "results.csv") as f:
        csv_rows = {r["impl"]: r for r in csv.DictReader(f)}
    assert csv_rows["mpncov"]["space"] == "gram"
    assert float(csv_rows["mpncov"]["speedup_fwdbwd_vs_mpncov-cov"]) > 0
    # the forced spaces are pipeline-only implementations
    assert baselines.get_impl("mpncov-gram").ops == ("pipeline",)


def test_space_model_tool_measures_and_fits(capsys):
    from mpncov.benchmarks import spaces
    assert spaces.main(["--shapes", "C=12,M=4,N=3;C=6,M=9,N=1", "--reps", "1", "--batch", "2",
                        "--fit"]) == 0
    out = capsys.readouterr().out
    assert out.count("cov/gram measured") == 2 and "fitted BLAS_CALL" in out
    rows = [{"C": 12, "M": 4, "N": 3, "cov": 2.0, "gram": 1.0}]
    assert spaces.log_error(rows, blas_call=0, elementwise=0) >= 0
