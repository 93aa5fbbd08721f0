"""Train a second-order ResNet on synthetic data: ``python examples/train.py --help``."""
from mpncov.train import main
main()
