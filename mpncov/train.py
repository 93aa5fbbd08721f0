"""Train a (second-order) ResNet: ``python -m mpncov.train --help``.

The default data set needs no download: synthetic images whose classes have the same
per-channel means and variances and differ only in how the channels co-vary, the case
that first-order (average pooling) features cannot see directly and covariance pooling
can. ``--data DIR`` reads an ImageFolder-style tree (``DIR/train/<class>/*``,
``DIR/val/<class>/*``, or ``DIR/<class>/*`` split by ``--val-split``) of ``.npy`` arrays
(HWC or CHW) or images (with Pillow, if installed).

Distributed: run under ``torchrun --nproc_per_node=N -m mpncov.train ...``; each process
uses DistributedDataParallel (NCCL on GPU, gloo on CPU) with a DistributedSampler, and
BatchNorm layers become SyncBatchNorm on GPU (``--sync-bn`` forces it, ``--no-sync-bn``
turns it off).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data.distributed import DistributedSampler

from ._progress import progress_bar

__all__ = ["make_synthetic", "load_folder", "build_parser", "main"]


# ------------------------------------------------------------------------------ data
def make_synthetic(num_classes: int = 4, n_train: int = 1024, n_val: int = 512,
                   img_size: int = 16, channels: int = 3, seed: int = 0, smooth: int = 0):
    """Synthetic second-order classification task.

    Every pixel of an image of class c is ``L_c @ z`` with z ~ N(0, I) shared across
    classes and ``L_c`` a random mixing matrix whose rows have unit norm, so every
    channel has mean 0 and variance 1 whatever the class; the classes differ only in
    the channel correlations ``L_c L_c^T``. ``smooth > 0`` blurs z spatially with a box
    filter (then rescaled to unit variance) to give the images some spatial structure.
    Returns ((x_train, y_train), (x_val, y_val)) tensors, x: (N, C, S, S) float32.
    """
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(num_classes, channels, channels, generator=g)
    mix = mix / mix.norm(dim=2, keepdim=True)  # unit-norm rows: unit channel variance

    def draw(n):
        y = torch.arange(n) % num_classes
        y = y[torch.randperm(n, generator=g)]
        z = torch.randn(n, channels, img_size, img_size, generator=g)
        if smooth > 0:
            k = 2 * smooth + 1
            z = F.avg_pool2d(F.pad(z, (smooth,) * 4, mode="circular"), k, stride=1)
            z = z / z.std(dim=(0, 2, 3), keepdim=True)
        x = torch.einsum("nij,njhw->nihw", mix[y], z)
        return x.contiguous(), y

    return draw(n_train), draw(n_val)


def _read_file(path, img_size):
    import numpy as np

    if path.endswith(".npy"):
        a = np.load(path).astype("float32")
        if a.ndim == 2:
            a = a[None]
        elif a.shape[-1] in (1, 3, 4) and a.shape[0] not in (1, 3, 4):
            a = a.transpose(2, 0, 1)  # HWC -> CHW
        t = torch.from_numpy(np.ascontiguousarray(a))
    else:
        try:
            from PIL import Image
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise RuntimeError(f"reading {path} needs Pillow (or use .npy files)") from e
        with Image.open(path) as im:
            a = np.asarray(im.convert("RGB"), dtype="float32") / 255.0
        t = torch.from_numpy(a.transpose(2, 0, 1).copy())
    if t.shape[-2:] != (img_size, img_size):
        t = F.interpolate(t[None], size=(img_size, img_size), mode="bilinear",
                          align_corners=False)[0]
    return t


_EXTS = (".npy", ".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".tif", ".tiff", ".webp")


def _scan(root):
    classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    items = []
    for ci, c in enumerate(classes):
        for f in sorted(os.listdir(os.path.join(root, c))):
            if f.lower().endswith(_EXTS):
                items.append((os.path.join(root, c, f), ci))
    return classes, items


def load_folder(root: str, img_size: int = 32, val_split: float = 0.2, seed: int = 0):
    """Load an ImageFolder-style tree into memory; returns (train, val, classes) with
    train/val = (x, y), x normalised with the training set's per-channel mean/std."""
    def load(items):
        xs = [_read_file(p, img_size) for p, _ in items]
        c = max(x.shape[0] for x in xs)
        xs = [x.expand(c, -1, -1) if x.shape[0] == 1 else x[:c] for x in xs]
        return torch.stack(xs), torch.tensor([y for _, y in items], dtype=torch.long)

    if os.path.isdir(os.path.join(root, "train")):
        classes, tr = _scan(os.path.join(root, "train"))
        vdir = os.path.join(root, "val")
        va = _scan(vdir)[1] if os.path.isdir(vdir) else []
    else:
        classes, items = _scan(root)
        rng = random.Random(seed)
        rng.shuffle(items)
        nv = int(round(len(items) * val_split))
        va, tr = items[:nv], items[nv:]
    if not tr:
        raise RuntimeError(f"no training files found under {root}")
    xt, yt = load(tr)
    mean = xt.mean(dim=(0, 2, 3), keepdim=True)
    std = xt.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6)
    xt = (xt - mean) / std
    if va:
        xv, yv = load(va)
        xv = (xv - mean) / std
    else:
        xv, yv = xt[:0], yt[:0]
    return (xt, yt), (xv, yv), classes


# ----------------------------------------------------------------------- distributed
def _dist_env():
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return world > 1, int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0"))


def _all_reduce_sum(values, device):
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


# ---------------------------------------------------------------------------- train
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mpncov.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="isqrt_cov_resnet_tiny",
                   help="a name from mpncov.models.list_models() (default: %(default)s)")
    p.add_argument("--data", default=None, help="ImageFolder-style directory (default: synthetic)")
    p.add_argument("--num-classes", type=int, default=4, help="synthetic classes")
    p.add_argument("--train-size", type=int, default=1024, help="synthetic training images")
    p.add_argument("--val-size", type=int, default=512, help="synthetic validation images")
    p.add_argument("--img-size", type=int, default=16)
    p.add_argument("--smooth", type=int, default=0, help="synthetic spatial blur radius")
    p.add_argument("--val-split", type=float, default=0.2, help="for --data without train/val")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=64, help="per process")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--opt", choices=("sgd", "adamw"), default="adamw")
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--weight-decay", type=float, default=0.05,
                   help="not applied to 1-D parameters (biases, norms, GCT)")
    p.add_argument("--warmup-epochs", type=float, default=0.0)
    p.add_argument("--amp", action="store_true", help="autocast (fp16 on CUDA, bf16 on CPU)")
    p.add_argument("--amp-dtype", choices=("float16", "bfloat16"), default=None)
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--sync-bn", dest="sync_bn", action="store_true", default=None)
    p.add_argument("--no-sync-bn", dest="sync_bn", action="store_false")
    p.add_argument("--checkpoint", default=None,
                   help="save model/optimiser/scheduler state here after each epoch; "
                        "'{epoch}' in the path keeps one file per epoch")
    p.add_argument("--resume", default=None, help="resume from this checkpoint")
    p.add_argument("--log-json", default=None, help="write per-epoch loss/accuracy here")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="default: cuda if available else cpu")
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--no-progress", dest="progress", action="store_false", default=True,
                   help="no per-batch progress bar (it is shown only on a terminal and "
                        "with tqdm installed)")
    p.add_argument("--model-kwargs", default=None, help="JSON dict passed to create_model")
    return p


def _param_groups(model, weight_decay):
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    return [dict(params=decay, weight_decay=weight_decay), dict(params=no_decay, weight_decay=0.0)]


def _unwrap(model):
    model = getattr(model, "module", model)  # DDP
    return getattr(model, "_orig_mod", model)  # torch.compile


def _run_epoch(model, loader, device, args, amp_dtype, optimizer=None, scheduler=None,
               scaler=None, desc="", show=True):
    train = optimizer is not None
    model.train(train)
    tot_loss = tot_correct = tot_n = 0.0
    bar = progress_bar(len(loader), desc, enabled=show and args.progress, unit="batch")
    mf = torch.channels_last if args.channels_last else torch.contiguous_format
    with torch.set_grad_enabled(train):
        for x, y in loader:
            x = x.to(device, non_blocking=True).contiguous(memory_format=mf)
            y = y.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                out = model(x)
                loss = F.cross_entropy(out.float(), y)
            if train:
                optimizer.zero_grad(set_to_none=True)
                if scaler is not None:
                    scaler.scale(loss).backward()
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    loss.backward()
                    optimizer.step()
                scheduler.step()
            n = y.numel()
            tot_loss += loss.item() * n
            tot_correct += (out.argmax(1) == y).sum().item()
            tot_n += n
            bar.set_postfix(loss=tot_loss / tot_n, acc=tot_correct / tot_n, refresh=False)
            bar.update()
    bar.close()
    tot_loss, tot_correct, tot_n = _all_reduce_sum([tot_loss, tot_correct, tot_n], device)
    return tot_loss / max(tot_n, 1), tot_correct / max(tot_n, 1)


def main(argv=None) -> dict:
    """Run training; returns a dict with the last epoch's metrics and the history."""
    from mpncov.models import create_model

    args = build_parser().parse_args(argv)
    distributed, rank, world, local_rank = _dist_env()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device:
        device = torch.device(args.device)
    else:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        if distributed:
            device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if distributed and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    is_main = rank == 0
    random.seed(args.seed)
    torch.manual_seed(args.seed)

    # data
    if args.data:
        (xt, yt), (xv, yv), classes = load_folder(args.data, args.img_size, args.val_split, args.seed)
        num_classes = len(classes)
    else:
        (xt, yt), (xv, yv) = make_synthetic(args.num_classes, args.train_size, args.val_size,
                                            args.img_size, 3, args.seed, args.smooth)
        num_classes = args.num_classes
    train_ds, val_ds = TensorDataset(xt, yt), TensorDataset(xv, yv)
    if distributed:
        train_sampler = DistributedSampler(train_ds, num_replicas=world, rank=rank, shuffle=True,
                                           seed=args.seed, drop_last=True)
        val_sampler = DistributedSampler(val_ds, num_replicas=world, rank=rank, shuffle=False)
    else:
        train_sampler, val_sampler = None, None
    gen = torch.Generator().manual_seed(args.seed)
    pin = device.type == "cuda"
    train_loader = DataLoader(train_ds, args.batch_size, shuffle=train_sampler is None,
                              sampler=train_sampler, drop_last=True, num_workers=args.workers,
                              pin_memory=pin, generator=gen)
    val_loader = DataLoader(val_ds, args.batch_size, shuffle=False, sampler=val_sampler,
                            num_workers=args.workers, pin_memory=pin)

    # model
    mkw = json.loads(args.model_kwargs) if args.model_kwargs else {}
    model = create_model(args.model, num_classes=num_classes, in_chans=xt.shape[1], **mkw)
    sync_bn = args.sync_bn if args.sync_bn is not None else (distributed and device.type == "cuda")
    if sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model.to(device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)

    steps_per_epoch = max(1, len(train_loader))
    total_steps = args.epochs * steps_per_epoch
    warm = int(args.warmup_epochs * steps_per_epoch)
    groups = _param_groups(model, args.weight_decay)
    if args.opt == "sgd":
        optimizer = torch.optim.SGD(groups, lr=args.lr, momentum=args.momentum, nesterov=True)
    else:
        optimizer = torch.optim.AdamW(groups, lr=args.lr)

    def lr_lambda(step):
        if step < warm:
            return (step + 1) / warm
        t = (step - warm) / max(1, total_steps - warm)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)
    amp_dtype = None
    if args.amp:
        amp_dtype = getattr(torch, args.amp_dtype) if args.amp_dtype else (
            torch.float16 if device.type == "cuda" else torch.bfloat16)
    scaler = torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None

    start_epoch, history = 0, []
    if args.resume:
        ck = torch.load(args.resume, map_location=device, weights_only=False)
        model.load_state_dict(ck["model"])
        optimizer.load_state_dict(ck["optimizer"])
        scheduler.load_state_dict(ck["scheduler"])
        if scaler is not None and ck.get("scaler"):
            scaler.load_state_dict(ck["scaler"])
        start_epoch, history = ck["epoch"] + 1, list(ck.get("history", []))[: ck["epoch"] + 1]

    run_model = model
    if distributed:
        run_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    if args.compile:
        run_model = torch.compile(run_model)

    if is_main:
        n_params = sum(p.numel() for p in model.parameters())
        print(f"model {args.model}: {n_params:,} parameters; {len(train_ds)} train / "
              f"{len(val_ds)} val images, {num_classes} classes; device {device}"
              + (f", {world} processes" if distributed else ""), file=sys.stderr)

    result = dict(history[-1]) if history else {}
    result.update(history=history, model=args.model)
    for epoch in range(start_epoch, args.epochs):
        # per-epoch shuffling seeds: a resumed run sees the batches of an uninterrupted one
        gen.manual_seed(args.seed * 1000003 + epoch)
        if train_sampler is not None:
            train_sampler.set_epoch(epoch)
        t0 = time.time()
        tl, ta = _run_epoch(run_model, train_loader, device, args, amp_dtype, optimizer,
                            scheduler, scaler, f"epoch {epoch + 1}/{args.epochs}", is_main)
        vl, va = (float("nan"), float("nan"))
        if len(val_ds):
            vl, va = _run_epoch(run_model, val_loader, device, args, amp_dtype, desc="  val",
                                show=is_main)
        rec = dict(epoch=epoch + 1, train_loss=tl, train_acc=ta, val_loss=vl, val_acc=va,
                   lr=optimizer.param_groups[0]["lr"], time_s=time.time() - t0)
        history.append(rec)
        result = dict(rec, history=history, model=args.model)
        if is_main:
            print(f"epoch {epoch + 1}: train loss {tl:.4f} acc {ta:.4f} | val loss {vl:.4f} "
                  f"acc {va:.4f} | {rec['time_s']:.1f}s", file=sys.stderr)
            if args.log_json:
                with open(args.log_json, "w") as f:
                    json.dump(dict(args=vars(args), history=history), f, indent=1)
            if args.checkpoint:
                ck = dict(model=_unwrap(run_model).state_dict(), optimizer=optimizer.state_dict(),
                          scheduler=scheduler.state_dict(), epoch=epoch, history=history,
                          args=vars(args),
                          scaler=scaler.state_dict() if scaler is not None else None)
                path = args.checkpoint.format(epoch=epoch + 1)
                tmp = path + ".tmp"
                torch.save(ck, tmp)
                os.replace(tmp, path)
    if distributed:
        dist.barrier()
    return result


if __name__ == "__main__":
    main()
