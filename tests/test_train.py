"""Tests of the training example: synthetic data, training runs, checkpoints, DDP."""
import io
import json
import os
import socket
import subprocess
import sys
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from mpncov import _progress
from mpncov.models import create_model
from mpncov.train import load_folder, main, make_synthetic

torch.set_num_threads(min(2, torch.get_num_threads()))
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["--train-size", "128", "--val-size", "64", "--batch-size", "32", "--no-progress",
         "--threads", "2"]


def test_synthetic_classes_differ_only_in_covariance():
    (x, y), (xv, yv) = make_synthetic(num_classes=3, n_train=1200, n_val=30, img_size=16, seed=0)
    assert x.shape == (1200, 3, 16, 16) and xv.shape == (30, 3, 16, 16)
    assert torch.bincount(y).tolist() == [400, 400, 400]
    corrs = []
    for c in range(3):
        xc = x[y == c].transpose(0, 1).reshape(3, -1)
        torch.testing.assert_close(xc.mean(1), torch.zeros(3), atol=0.02, rtol=0)
        torch.testing.assert_close(xc.var(1), torch.ones(3), atol=0.03, rtol=0)
        corrs.append(torch.corrcoef(xc))
    # second-order statistics differ between classes
    assert min((corrs[i] - corrs[j]).abs().max() for i in range(3) for j in range(i)) > 0.1


def test_isqrt_cov_learns_synthetic_task():
    # about 5 s of CPU on an idle 2-core machine (1024 images of 16x16, 4 epochs)
    res = main(["--model", "isqrt_cov_resnet_tiny", "--epochs", "4", "--train-size", "768",
                "--lr", "1e-2", "--seed", "0", "--no-progress", "--threads", "2"])
    assert res["val_acc"] >= 0.7, res  # chance is 0.25


def test_checkpoint_resume_and_log_json(tmp_path):
    ck, log = str(tmp_path / "ck_{epoch}.pt"), str(tmp_path / "log.json")
    full = main(["--model", "gsop_resnet_tiny", "--epochs", "3", "--checkpoint", ck,
                 "--log-json", log] + SMALL)
    h = json.load(open(log))["history"]
    assert [e["epoch"] for e in h] == [1, 2, 3]
    assert {"train_loss", "train_acc", "val_loss", "val_acc", "lr"} <= set(h[0])
    state = torch.load(str(tmp_path / "ck_1.pt"), weights_only=False)
    assert state["epoch"] == 0 and {"model", "optimizer", "scheduler"} <= set(state)
    # resume the interrupted run after epoch 1: it ends where the uninterrupted one did
    log2 = str(tmp_path / "log2.json")
    res = main(["--model", "gsop_resnet_tiny", "--epochs", "3", "--resume",
                str(tmp_path / "ck_1.pt"), "--log-json", log2] + SMALL)
    assert [e["epoch"] for e in res["history"]] == [1, 2, 3]
    assert [e["epoch"] for e in json.load(open(log2))["history"]] == [1, 2, 3]
    for k in ("train_loss", "val_loss", "val_acc"):
        assert res[k] == pytest.approx(full[k], rel=1e-4, abs=1e-5), k
    # nothing left to do: returns the stored history
    done = main(["--model", "gsop_resnet_tiny", "--epochs", "3", "--resume",
                 str(tmp_path / "ck_3.pt")] + SMALL)
    assert done["epoch"] == 3 and len(done["history"]) == 3


def test_amp_channels_last_and_folder_data(tmp_path):
    import numpy as np
    (x, y), _ = make_synthetic(num_classes=2, n_train=24, n_val=0, img_size=12, seed=1)
    for i in range(24):
        d = tmp_path / "data" / f"class{int(y[i])}"
        d.mkdir(parents=True, exist_ok=True)
        np.save(d / f"{i}.npy", x[i].permute(1, 2, 0).numpy())  # HWC arrays
    (xt, yt), (xv, yv), classes = load_folder(str(tmp_path / "data"), img_size=12, val_split=0.25)
    assert classes == ["class0", "class1"] and xt.shape[1:] == (3, 12, 12)
    assert len(xt) + len(xv) == 24 and len(xv) == 6
    res = main(["--model", "se_resnet_tiny", "--data", str(tmp_path / "data"), "--img-size", "12",
                "--epochs", "1", "--batch-size", "8", "--amp", "--channels-last", "--no-progress"])
    assert res["epoch"] == 1 and res["train_loss"] == res["train_loss"]  # finite, not NaN


class _Terminal(io.StringIO):
    def isatty(self):
        return True


@pytest.mark.parametrize("stream", ["terminal", "terminal without tqdm", "log file"])
def test_progress_bar_only_on_a_terminal(stream, monkeypatch):
    out = io.StringIO() if stream == "log file" else _Terminal()
    if stream == "terminal without tqdm":
        monkeypatch.setitem(sys.modules, "tqdm", None)   # importing tqdm fails
        monkeypatch.setattr(_progress, "_NOTED_MISSING", False)
    elif stream == "terminal":
        pytest.importorskip("tqdm")
    monkeypatch.setattr(sys, "stderr", out)
    res = main(["--model", "resnet_tiny", "--epochs", "1", "--train-size", "64", "--val-size",
                "32", "--batch-size", "32", "--threads", "2"])
    assert res["epoch"] == 1
    text = out.getvalue()
    assert "epoch 1: train loss" in text                      # the epoch summary, always
    if stream == "terminal":
        assert "\r" in text and "epoch 1/1" in text and "2/2" in text and "loss=" in text
    else:
        assert "\r" not in text and "loss=" not in text
        assert ("tqdm is not installed" in text) == (stream == "terminal without tqdm")


def test_example_script_help():
    r = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "train.py"), "--help"],
                       capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=ROOT),
                       timeout=120)
    assert r.returncode == 0 and "--channels-last" in r.stdout and "--resume" in r.stdout


# ------------------------------------------------------------------------------- DDP
def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _batch():
    g = torch.Generator().manual_seed(0)
    return torch.randn(8, 3, 16, 16, generator=g), torch.randint(0, 4, (8,), generator=g)


def _model():
    torch.manual_seed(0)
    m = create_model("gsop_resnet_tiny", num_classes=4, attn_kwargs=dict(mode="+"))
    with torch.no_grad():  # eval-mode BN with non-trivial statistics: no batch coupling
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.normal_(0, 0.1)
                mod.running_var.uniform_(0.5, 1.5)
    return m.eval()


def _ddp_worker(rank, world, init, out):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        ddp = torch.nn.parallel.DistributedDataParallel(_model())
        x, y = _batch()
        n = x.shape[0] // world
        loss = F.cross_entropy(ddp(x[rank * n:(rank + 1) * n]), y[rank * n:(rank + 1) * n])
        loss.backward()
        if rank == 0:
            torch.save({k: p.grad for k, p in ddp.module.named_parameters()}, out)
    finally:
        dist.destroy_process_group()


def test_ddp_two_process_gradients_equal_single_process(tmp_path):
    out = str(tmp_path / "grads.pt")
    mp.spawn(_ddp_worker, args=(2, f"tcp://127.0.0.1:{_free_port()}", out), nprocs=2)
    ddp_grads = torch.load(out)
    m = _model()
    x, y = _batch()
    F.cross_entropy(m(x), y).backward()
    assert set(ddp_grads) == {k for k, _ in m.named_parameters()}
    for k, p in m.named_parameters():
        torch.testing.assert_close(ddp_grads[k], p.grad, rtol=1e-4, atol=1e-6, msg=k)


def _train_worker(rank, world, port, out):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    res = main(["--model", "isqrt_cov_resnet_tiny", "--epochs", "1", "--train-size", "128",
                "--val-size", "64", "--batch-size", "16", "--no-progress"])
    torch.save(res, f"{out}.{rank}")
    dist.destroy_process_group()


def test_distributed_training_run(tmp_path):
    out = str(tmp_path / "res")
    mp.spawn(_train_worker, args=(2, _free_port(), out), nprocs=2)
    r0, r1 = torch.load(out + ".0", weights_only=False), torch.load(out + ".1", weights_only=False)
    # metrics are all-reduced: both ranks report the same numbers
    assert r0["val_acc"] == r1["val_acc"] and r0["train_loss"] == r1["train_loss"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_amp_channels_last_training():
    res = main(["--model", "gsop2_resnet_tiny", "--epochs", "1", "--amp", "--channels-last",
                "--device", "cuda"] + SMALL)
    assert res["train_loss"] == res["train_loss"]
