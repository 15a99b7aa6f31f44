"""Train a model on CIFAR10 with and without rotation augmentation, measuring its invariance as it trains.

    python examples/cifar10.py --model resnet18 --width 0.25 --augmentation none rotation --epochs 10
    tensorboard --logdir runs/cifar10

The "CIFAR-10 python version" batches are read from --data-dir/cifar-10-batches-py; --download fetches them.
"""
import sys

from tm_tensorboard.examples import variants
from tm_tensorboard.examples.datasets import load_cifar10


def main(argv=None) -> int:
    args = variants.parser("CIFAR10", default_model="resnet18", default_epochs=10).parse_args(argv)
    try:
        train = load_cifar10(args.data_dir, train=True, download=args.download)
        test = load_cifar10(args.data_dir, train=False, download=args.download)
    except (FileNotFoundError, ConnectionError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    variants.train_variants(args, train, test)
    return 0


if __name__ == "__main__":
    sys.exit(main())
