"""The benchmark baselines compute the same thing as mpncov, and the runner works end to end."""
import csv
import json

import pytest
import torch

from benchmarks import baselines
from benchmarks import run as brun

DT = torch.float64


def _mpncov_or_skip():
    try:
        return baselines.get_impl("mpncov")
    except Exception as e:  # extension not built
        pytest.skip(f"mpncov not importable: {e}")


def _impls(with_mpncov=True):
    out = [baselines.get_impl("published"), baselines.get_impl("autograd")]
    if with_mpncov:
        out.append(_mpncov_or_skip())
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
    impls = _impls(with_mpncov=False)
    try:
        impls.append(baselines.get_impl("mpncov"))
    except Exception:
        pass
    # mpncov.sqrtm is defined on the symmetric part of its input, so its gradient is the
    # symmetric part of the baselines' (which differentiate S as given).
    results = []
    for i in impls:
        out, grad = _fwd_grad(lambda t: i.sqrtm(t, iters), s)
        results.append((i.name, (out, (grad + grad.transpose(1, 2)) / 2)))
    _assert_all_close(results)


def test_triuvec_agree():
    s = _spd()
    impls = _impls(with_mpncov=False)
    try:
        impls.append(baselines.get_impl("mpncov"))
    except Exception:
        pass
    res = [(i.name, _fwd_grad(i.triuvec, s)) for i in impls]
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
    try:
        mp = baselines.get_impl("mpncov")
    except Exception:
        return
    o_m, g_m = _fwd_grad(lambda t: mp.pipeline(t, 30), x)
    torch.testing.assert_close(o_m, o_e, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(g_m, g_e, rtol=1e-4, atol=1e-6)
    o_m, g_m = _fwd_grad(lambda t: mp.sqrtm(t, 30), s)
    o_e, g_e = _fwd_grad(eigh.sqrtm, s)
    torch.testing.assert_close(o_m, o_e, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(_sym(g_m), _sym(g_e), rtol=1e-4, atol=1e-6)


def test_flop_model():
    f, b = brun.flops("sqrtm", {"B": 2, "C": 4, "N": 5})
    assert f == 2 * 12 * 2 * 4 ** 3 and b == 2 * 24 * 2 * 4 ** 3
    f, b = brun.flops("covpool", {"B": 1, "C": 4, "M": 10})
    assert f == b == 2 * 16 * 10
    assert brun.flops("triuvec", {"B": 2, "C": 4}) == (0.0, 0.0)


def test_shape_filter_and_quick_targets():
    args, _ = brun.parse_args(["--shapes", "B=4,C=8,M=16,N=3; B=2,C=8", "--ops", "sqrtm,pipeline"])
    args.dtypes = ["fp32"]
    cfgs = brun.build_configs(args)
    got = {(op, brun.shape_str(op, s)) for op, s, _ in cfgs}
    assert got == {("sqrtm", "B=4,C=8,N=3"), ("pipeline", "B=4,C=8,M=16,N=3"),
                   ("sqrtm", "B=2,C=8,N=5"), ("pipeline", "B=2,C=8,M=196,N=5")}
    args, _ = brun.parse_args([])
    assert args.quick and args.run_ops
    args.dtypes = ["fp32"]
    got = {(op, brun.shape_str(op, s)) for op, s, _ in brun.build_configs(args)}
    for target in [("pipeline", "B=32,C=256,M=196,N=5"), ("pipeline", "B=64,C=64,M=196,N=3"),
                   ("covpool", "B=32,C=128,M=784")]:
        assert target in got
    args, _ = brun.parse_args(["--networks"])
    assert not args.run_ops


def test_smoke_run_writes_outputs(tmp_path, capsys):
    impls = "published,autograd,eigh"
    try:
        baselines.get_impl("mpncov")
        impls = "mpncov," + impls
    except Exception:
        pass
    rc = brun.main(["--smoke", "--device", "cpu", "--threads", "1", "--impls", impls, "--out", str(tmp_path),
                    "--min-run-time", "0.002", "--min-reps", "2"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "fwd+bwd ms" in printed
    doc = json.loads((tmp_path / "results.json").read_text())
    env = doc["env"]
    for key in ("cpu_model", "threads", "torch", "python", "command", "date_utc", "mpncov"):
        assert key in env
    rows = doc["results"]
    n_impl = len(impls.split(","))
    n_expected = 2 * (n_impl - ("eigh" in impls)) + 2 * n_impl   # eigh: sqrtm + pipeline only
    assert len(rows) == n_expected
    for r in rows:
        assert r["error"] is None, r
        for k in ("fwd", "bwd", "fwdbwd"):
            assert r[k]["median_ms"] > 0 and r[k]["runs"] >= 2
        assert r["peak_mb"] >= 0 and r["grad_finite"]
        if r["impl"] not in ("mpncov", "eigh") and "rel_diff_vs_mpncov" in r:
            assert r["rel_diff_vs_mpncov"] < 1e-4
    if "mpncov" in impls:
        assert any(r.get("speedup_fwdbwd") for r in rows if r["impl"] == "mpncov")
    with open(tmp_path / "results.csv") as f:
        csv_rows = list(csv.DictReader(f))
    assert len(csv_rows) == len(rows)
    assert float(csv_rows[0]["fwdbwd_median_ms"]) > 0
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    for name in ("speedup_vs_C.png", "pipeline_split.png") if "mpncov" in impls else ("pipeline_split.png",):
        data = (tmp_path / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_writes_png_when_matplotlib_present(tmp_path):
    pytest.importorskip("matplotlib")
    from benchmarks import plot
    t = {"median_ms": 1.0, "iqr_ms": 0.1, "runs": 3}
    rows = []
    for c in (8, 16):
        for impl, ms in (("mpncov", 1.0), ("published", 3.0)):
            rows.append({"op": "pipeline", "shape": f"B=2,C={c},M=16,N=3", "B": 2, "C": c, "M": 16,
                         "N": 3, "dtype": "fp32", "impl": impl, "error": None,
                         "fwd": {**t, "median_ms": ms / 3}, "bwd": {**t, "median_ms": 2 * ms / 3},
                         "fwdbwd": {**t, "median_ms": ms}})
    brun.add_speedups(rows)
    files = plot.make_plots(rows, tmp_path)
    assert {p.name for p in files} == {"speedup_vs_C.png", "pipeline_split.png"}
    for p in files:
        assert p.read_bytes()[:4] == b"\x89PNG"


def test_networks_section_tiny(tmp_path, capsys):
    models = pytest.importorskip("mpncov.models")
    names = [n for n in ("resnet_tiny", "isqrt_cov_resnet_tiny") if n in models.list_models()]
    if not names:
        pytest.skip("no tiny models in mpncov.models")
    rc = brun.main(["--networks", "--network-names", ",".join(names + ["no_such_model"]),
                    "--net-batch", "2", "--net-size", "32", "--threads", "1",
                    "--min-run-time", "0.002", "--min-reps", "2", "--out", str(tmp_path),
                    "--device", "cpu"])
    assert rc == 0
    doc = json.loads((tmp_path / "results.json").read_text())
    assert doc["results"] == []
    nets = {r["model"] or r["network"]: r for r in doc["networks"]}
    for n in names:
        assert nets[n]["error"] is None and nets[n]["images_per_s"] > 0
    assert nets["no_such_model"]["error"]
    assert (tmp_path / "networks.csv").exists()


def test_profile_kernels_smoke(tmp_path, capsys):
    _mpncov_or_skip()
    from benchmarks import profile_kernels
    out = tmp_path / "profile.json"
    assert profile_kernels.main(["--device", "cpu", "--shape", "B=2,C=8,M=16,N=3", "--steps", "1",
                                 "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["rows"] and abs(sum(r["share"] for r in data["rows"]) - 1) < 1e-6
    assert any("mpncov::" in r["name"] for r in data["rows"])
    assert "total ms per step" in capsys.readouterr().out
