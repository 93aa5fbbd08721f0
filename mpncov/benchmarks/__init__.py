"""Micro-benchmarks of mpncov: ``python -m mpncov.benchmarks --help`` (or ``mpncov-bench``).

* :mod:`.cli` - the command line (``main``), modes and their timing presets applied.
* :mod:`.config` - ops, shape grids, the quick/full/smoke sets, dtypes, timing presets.
* :mod:`.baselines` - the implementations compared: "published" (the structure of
  fast-MPN-COV's MPNCOV.py, gradient bug fixed), "autograd" (plain torch ops), "eigh"
  (exact root by eigendecomposition), "mpncov" (this package; its pipeline picks the
  C x C or the M x M Gram space), "mpncov-cov" / "mpncov-gram" (its pipeline in one space).
* :mod:`.sweep` - the op sweep: fwd / bwd / fwd+bwd of every configuration and
  implementation, implementations taking turns over --rounds, speed-ups.
* :mod:`.timing`, :mod:`.memory`, :mod:`.flops` - how times, memory and effective
  TFLOP/s are measured (each module's docstring states the method).
* :mod:`.networks` - the network section (images/s of ResNet-50 variants).
* :mod:`.report` - the printed tables; :mod:`.output` - results.json / results.csv /
  networks.csv; :mod:`.plot` - PNG plots (matplotlib, if installed).
* :mod:`.env` - the machine / build description stored with the results.
* :mod:`.profile_kernels` - per-kernel time of one training step (``python -m
  mpncov.benchmarks.profile_kernels``).
* :mod:`.spaces` - the cost model that picks the pipeline's space against measured times
  of both spaces (``python -m mpncov.benchmarks.spaces [--fit]``).

The committed results are data in the repository's ``benchmarks/results/``.
"""
