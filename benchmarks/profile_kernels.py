"""``python -m benchmarks.profile_kernels``: the same as
``python -m mpncov.benchmarks.profile_kernels`` (kept for scripts that call it)."""
import sys

from benchmarks import use_built_mpncov

if __name__ == "__main__":
    use_built_mpncov()
    from mpncov.benchmarks.profile_kernels import main

    sys.exit(main())
