"""``python -m mpncov.benchmarks``: the micro-benchmark (see ``--help``)."""
import sys

from .cli import main

sys.exit(main(prog="python -m mpncov.benchmarks"))
