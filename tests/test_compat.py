"""mpncov.compat keeps the published MPNCOV.py names and shapes."""
import torch

import mpncov
from mpncov.compat import CovpoolLayer, SqrtmLayer, TriuvecLayer
from reference import covpool_ref, sqrtm_ref, triuvec_ref


def test_published_names_and_shapes():
    x = torch.randn(2, 6, 3, 3, dtype=torch.float64)
    s = CovpoolLayer(x)
    assert s.shape == (2, 6, 6)
    torch.testing.assert_close(s, covpool_ref(x))
    y = SqrtmLayer(s, 3)
    torch.testing.assert_close(y, sqrtm_ref(s, 3))
    v = TriuvecLayer(y)
    assert v.shape == (2, 21, 1)
    torch.testing.assert_close(v[..., 0], triuvec_ref(y))


def test_mpncov_module_is_reexported():
    from mpncov.compat import MPNCOV
    assert MPNCOV is mpncov.nn.MPNCOV
