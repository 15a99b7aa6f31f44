"""The MNIST and CIFAR10 scripts' shared part: their options, and one training run per augmentation."""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

import tm_tensorboard as tm
from tm_tensorboard.examples.models import MODELS, VisionTransformer, build_model
from tm_tensorboard.examples.training import AUGMENTATIONS, train_run


def parser(dataset: str, default_model: str, default_epochs: int) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=f"Train on {dataset} with and without augmentation; each variant is a run under --logdir, "
        "measured by tm-tensorboard's Monitor while it trains.",
    )
    p.add_argument("--model", choices=sorted(MODELS), default=default_model)
    p.add_argument("--width", type=float, default=1.0, help="channel multiplier of the model (default: 1)")
    p.add_argument("--augmentation", nargs="+", choices=AUGMENTATIONS, default=["none", "rotation"],
                   help="one run per augmentation (default: none rotation)")
    p.add_argument("--epochs", type=float, default=default_epochs)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--rotations", type=int, default=16, help="measure under this many rotations (default: 16)")
    p.add_argument("--probe-size", type=int, default=256)
    p.add_argument("--every", type=int, default=200, help="measure every N steps (default: 200)")
    p.add_argument("--logdir", default=f"runs/{dataset.lower()}")
    p.add_argument("--data-dir", default=f"data/{dataset.lower()}", help="where the dataset files are")
    p.add_argument("--download", action="store_true", help="download the dataset files if missing")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--smoke", action="store_true", help="a tiny budget that checks everything runs")
    return p


def monitor_options(model: torch.nn.Module, image_size: tuple[int, int]) -> dict:
    """The Monitor's options for ``model``: the noise floor, and for a Vision Transformer its tokens laid out
    on its patch grid (so that its blocks get same-equivariance)."""
    options: dict = dict(noise_floor=True)
    if isinstance(model, VisionTransformer):
        options["actions"] = tm.actions.patch_grid(*model.grid(*image_size), cls_tokens=model.cls_tokens)
    return options


def train_variants(args: argparse.Namespace, train: tuple, test: tuple) -> None:
    """Train one run per augmentation and print their final metrics."""
    if args.smoke:
        train, test = (train[0][:512], train[1][:512]), (test[0][:256], test[1][:256])
    steps = 20 if args.smoke else max(1, round(args.epochs * len(train[0]) / args.batch_size))
    channels, classes = train[0].shape[1], int(train[1].max()) + 1
    device = torch.device(args.device)
    train = (train[0].to(device), train[1].to(device))
    test = (test[0].to(device), test[1].to(device))
    for augmentation in args.augmentation:
        name = f"{args.model}-{augmentation}"
        model = build_model(args.model, channels, classes, width=args.width).to(device)
        metrics = train_run(
            model, train, test, Path(args.logdir) / name,
            augmentation=augmentation,
            steps=steps,
            batch_size=args.batch_size,
            lr=args.lr,
            probe_size=32 if args.smoke else args.probe_size,
            transformations=tm.transforms.rotations(4 if args.smoke else args.rotations),
            every=10 if args.smoke else args.every,
            monitor_options=monitor_options(model, tuple(train[0].shape[-2:])),
        )
        print(f"{name}: " + ", ".join(f"{k} {v:.3f}" for k, v in metrics.items()), flush=True)
    print(f"done: tensorboard --logdir {args.logdir}")
