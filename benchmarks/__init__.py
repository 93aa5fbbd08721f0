"""Micro-benchmarks of mpncov (see ``python -m benchmarks.run --help``).

* :mod:`benchmarks.baselines` - the implementations compared: "published" (the structure of
  fast-MPN-COV's MPNCOV.py, gradient bug fixed), "autograd" (plain torch ops), "eigh"
  (exact root by eigendecomposition), "mpncov" (this package).
* :mod:`benchmarks.run` - the sweep: fwd / bwd / fwd+bwd times (median, IQR), peak memory,
  effective TFLOP/s, speed-ups; writes results.json, results.csv and PNG plots.
* :mod:`benchmarks.plot` - the plots (matplotlib optional).
* :mod:`benchmarks.env` - the machine / build description stored with the results.
"""
