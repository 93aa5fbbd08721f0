"""vmap rules of the mpncov operators.

Every op works on a batch of samples along dim 0, so ``torch.vmap`` over another dim folds
that dim into the batch: the vmapped dim of each tensor argument is moved to the front and
merged with dim 0 (an argument that is not vmapped is expanded first), the op runs once, and
dim 0 of each output is split again. With these, the ``autograd.Function`` classes of
``mpncov._autograd`` generate their own vmap rules, so ``torch.func.jacrev`` and
``torch.vmap(torch.func.grad(...))`` run the kernels batched instead of one sample at a
time."""
from __future__ import annotations

import torch

from . import _C  # noqa: F401  (registers the schemas)


def _folded(name):
    op = getattr(torch.ops.mpncov, name)

    def rule(info, in_dims, *args):
        v = info.batch_size
        folded = []
        for arg, dim in zip(args, in_dims):
            if isinstance(arg, torch.Tensor):
                arg = arg.movedim(dim, 0) if dim is not None else arg.expand(v, *arg.shape)
                arg = arg.reshape(v * arg.shape[1], *arg.shape[2:])
            folded.append(arg)
        out = op(*folded)

        def split(o):
            return o.reshape(v, o.shape[0] // v, *o.shape[1:])

        if isinstance(out, (tuple, list)):
            return tuple(split(o) for o in out), (0,) * len(out)
        return split(out), 0

    return rule


for _name in ("covpool", "covpool_backward", "sqrtm", "sqrtm_backward", "triuvec",
              "triuvec_backward", "isqrt_cov", "isqrt_cov_backward", "isqrt_cov_gram",
              "isqrt_cov_gram_backward"):
    torch.library.register_vmap("mpncov::" + _name, _folded(_name))
