"""Train a model on MNIST with and without rotation augmentation, measuring its invariance as it trains.

    python examples/mnist.py --model simple_cnn --augmentation none rotation --epochs 2
    tensorboard --logdir runs/mnist

The four MNIST files are read from --data-dir (plain or .gz); --download fetches them when missing.
"""
import sys

from tm_tensorboard.examples import variants
from tm_tensorboard.examples.datasets import load_mnist


def main(argv=None) -> int:
    args = variants.parser("MNIST", default_model="simple_cnn", default_epochs=2).parse_args(argv)
    try:
        train = load_mnist(args.data_dir, train=True, download=args.download)
        test = load_mnist(args.data_dir, train=False, download=args.download)
    except (FileNotFoundError, ConnectionError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    variants.train_variants(args, train, test)
    return 0


if __name__ == "__main__":
    sys.exit(main())
