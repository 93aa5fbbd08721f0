"""``python -m benchmarks.run [options]``: the same as ``python -m mpncov.benchmarks``."""
import sys

from benchmarks import use_built_mpncov

if __name__ == "__main__":
    use_built_mpncov()
    from mpncov.benchmarks.cli import main

    sys.exit(main(prog="python -m benchmarks.run"))
