"""Measuring a finished run's saved checkpoints, as the Monitor would have measured them during training.

    tm-tensorboard measure --factory tm_tensorboard.examples.models:P4CNN --arg in_channels=1 \\
        --arg num_classes=10 --probe probe.pt --transformations "rot90()" --logdir runs/p4 ckpts/*.pt

Each checkpoint (a state dict, or a dict holding one under ``state_dict`` / ``model`` /
``model_state_dict``) is loaded into one model built by the factory and logged at its step: the
checkpoint's ``step`` / ``global_step`` / ``epoch`` entry, or else the last number in its file name.
A checkpoint that does not fit the model is reported by name and skipped; the others are measured.
"""
from __future__ import annotations

import argparse
import ast
import glob
import importlib
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

__all__ = ["measure_checkpoints", "CheckpointReport", "add_arguments", "measure_checkpoints_command"]

STEP_KEYS = ("step", "global_step", "epoch")
STATE_KEYS = ("state_dict", "model", "model_state_dict")
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin")
DATASETS = ("shapes", "mnist", "cifar10")
DEFAULT_PROBE_SIZE = 256  # samples taken from a named dataset's test split


@dataclass
class CheckpointReport:
    """What ``measure_checkpoints`` did: (file, step) measured in step order, (file, reason) skipped."""

    logdir: Path
    measured: list[tuple[Path, int]] = field(default_factory=list)
    skipped: list[tuple[Path, str]] = field(default_factory=list)


class _Skip(Exception):
    """A checkpoint that cannot be measured; the others still are."""


# --------------------------------------------------------------------------------------------- factory


def load_factory(spec: str) -> Callable[..., Any]:
    """The callable named ``package.module:function`` (the current directory is importable, as for ``python -m``)."""
    module_name, colon, attribute = spec.partition(":")
    if not colon or not module_name or not attribute:
        raise ValueError(
            f"the factory must be written package.module:function, e.g. tm_tensorboard.examples.models:P4CNN; got {spec!r}"
        )
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ImportError(
            f"cannot import {module_name!r} for the factory {spec!r} ({error}); run from the directory that holds "
            "it, add it to PYTHONPATH, or pip install its package"
        ) from error
    target: Any = module
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise ValueError(f"module {module_name!r} has no {attribute!r} (the factory {spec!r})")
        target = getattr(target, part)
    if not callable(target):
        raise ValueError(f"the factory {spec!r} is not callable")
    return target


def _build_model(factory: Callable[..., Any], kwargs: dict[str, Any]):
    from torch import nn

    name = getattr(factory, "__qualname__", repr(factory))
    try:
        model = factory(**kwargs)
    except TypeError as error:
        raise ValueError(f"calling the factory {name}(**{kwargs}) failed: {error}; pass its arguments with --arg NAME=VALUE") from error
    if not isinstance(model, nn.Module):
        raise ValueError(f"the factory {name} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def parse_kwargs(items: Sequence[str]) -> dict[str, Any]:
    """``["in_channels=1", "width=0.5", "name=abc"]`` → keyword arguments (Python literals, else strings)."""
    out: dict[str, Any] = {}
    for item in items:
        name, equals, text = item.partition("=")
        if not equals or not name.isidentifier():
            raise ValueError(f"factory arguments are NAME=VALUE, e.g. --arg num_classes=10; got {item!r}")
        try:
            out[name] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            out[name] = text
    return out


# ----------------------------------------------------------------------------------------- checkpoints


def find_checkpoints(patterns: Iterable[str | os.PathLike]) -> list[Path]:
    """Files named by ``patterns``: paths, glob patterns, or directories (their *.pt, *.pth, *.ckpt, *.bin)."""
    found: list[Path] = []
    for pattern in patterns:
        text = os.fspath(pattern)
        if glob.has_magic(text):
            matches = sorted(Path(p) for p in glob.glob(text) if Path(p).is_file())
            if not matches:
                raise FileNotFoundError(f"no checkpoint file matches {text!r}")
            found += matches
        elif Path(text).is_dir():
            matches = sorted(p for p in Path(text).iterdir() if p.suffix in CHECKPOINT_SUFFIXES and p.is_file())
            if not matches:
                raise FileNotFoundError(f"no checkpoint file ({', '.join(CHECKPOINT_SUFFIXES)}) in the directory {text!r}")
            found += matches
        elif Path(text).is_file():
            found.append(Path(text))
        else:
            raise FileNotFoundError(f"checkpoint {text!r} does not exist")
    if not found:
        raise ValueError("give at least one checkpoint file, glob pattern or directory")
    return list(dict.fromkeys(found))


def _load(path: Path, trust: bool, lazily: bool) -> Any:
    import pickle

    import torch

    try:
        if lazily:
            try:  # memory-mapped: reading the step costs next to nothing
                return torch.load(path, map_location="cpu", weights_only=not trust, mmap=True)
            except RuntimeError:  # the legacy (non-zip) format cannot be memory-mapped
                pass
        return torch.load(path, map_location="cpu", weights_only=not trust)
    except pickle.UnpicklingError as error:
        if trust or not str(error).startswith("Weights only load failed"):
            raise _Skip(f"cannot be read by torch.load: {str(error).splitlines()[0]}") from error
        raise _Skip(
            "holds Python objects that a weights-only load refuses; if you trust the file, pass --trust "
            "(trust=True) to unpickle it"
        ) from error
    except (RuntimeError, OSError, EOFError, ValueError) as error:
        raise _Skip(f"cannot be read by torch.load: {str(error).splitlines()[0] if str(error) else type(error).__name__}") from error


def _state_dict(content: Any) -> dict:
    import torch

    if isinstance(content, dict):
        if content and all(isinstance(v, torch.Tensor) for v in content.values()):
            return content
        for key in STATE_KEYS:
            if isinstance(content.get(key), dict):
                return _state_dict(content[key])
    raise _Skip(
        f"holds no state dict (tensors by parameter name, or a dict holding one under {', '.join(STATE_KEYS)})"
    )


def checkpoint_step(content: Any, path: Path) -> int:
    """The checkpoint's step: its step / global_step / epoch entry, else the last number in the file name."""
    import torch

    if isinstance(content, dict) and not all(isinstance(v, torch.Tensor) for v in content.values()):
        for key in STEP_KEYS:
            value = content.get(key)
            if hasattr(value, "item"):
                value = value.item()
            if isinstance(value, int) and not isinstance(value, bool):
                return value
    numbers = re.findall(r"\d+", path.stem)
    if numbers:
        return int(numbers[-1])
    raise _Skip(f"has no step: no {' / '.join(STEP_KEYS)} entry and no number in its file name (e.g. step-1000.pt)")


def _fitted(state: dict, model) -> dict:
    """``state`` with a prefix all its keys share removed (``model.``, ``module.``, ``_orig_mod.``) when
    that makes it name the model's parameters; else a _Skip saying how it differs from the model."""
    expected = model.state_dict()
    keys = set(state)
    while keys != set(expected) and keys and all("." in k for k in keys) and len({k.split(".", 1)[0] for k in keys}) == 1:
        state = {k.split(".", 1)[1]: v for k, v in state.items()}
        keys = set(state)
    if keys == set(expected):
        state = {k: state[k] for k in expected}  # the model's order
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    reshaped = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if not (missing or unexpected or reshaped):
        return state

    def some(names: list[str]) -> str:
        return ", ".join(names[:3]) + (", …" if len(names) > 3 else "")

    problems = []
    if missing:
        problems.append(f"{len(missing)} missing ({some(missing)})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected ({some(unexpected)})")
    if reshaped:
        k = reshaped[0]
        problems.append(
            f"{len(reshaped)} of another shape ({k}: checkpoint {list(state[k].shape)}, model {list(expected[k].shape)}"
            + (", …)" if len(reshaped) > 1 else ")")
        )
    raise _Skip("does not fit the model (another architecture or other factory arguments?): " + "; ".join(problems))


# ----------------------------------------------------------------------------------------------- probe


def load_probe(probe: Any, *, data_dir: str | os.PathLike | None = None, num_samples: int | None = None) -> Any:
    """What ``Monitor`` takes as a probe, from a ``.pt`` file (a tensor, an (images, labels) pair, or a dict
    with ``images`` and ``labels``), a dataset name (``shapes``: the demo's glyphs, no download; ``mnist``,
    ``cifar10``: their test split from ``data_dir``), or the probe itself."""
    import torch

    if not isinstance(probe, (str, os.PathLike)):
        return probe
    text = os.fspath(probe)
    if text in DATASETS:
        n = num_samples or DEFAULT_PROBE_SIZE
        if text == "shapes":
            from .examples.shapes import make_shapes

            return make_shapes(n, 32, seed=2)
        from .examples.datasets import load_cifar10, load_mnist

        loader = load_mnist if text == "mnist" else load_cifar10
        images, labels = loader(Path(data_dir or Path("data") / text), train=False)
        return images[:n], labels[:n]
    path = Path(text)
    if not path.is_file():
        raise FileNotFoundError(
            f"the probe {text!r} is neither a file nor one of {', '.join(DATASETS)}; save one with "
            "torch.save(images, 'probe.pt') or torch.save((images, labels), 'probe.pt')"
        )
    try:
        content = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ValueError(f"cannot read the probe {text!r} with torch.load: {str(error).splitlines()[0]}") from error
    if isinstance(content, dict) and "images" in content:
        content = (content["images"], content["labels"]) if content.get("labels") is not None else content["images"]
    if isinstance(content, list):
        content = tuple(content)
    if isinstance(content, torch.Tensor) or (
        isinstance(content, tuple) and len(content) == 2 and all(isinstance(c, torch.Tensor) for c in content)
    ):
        return content
    raise ValueError(
        f"the probe file {text!r} holds {type(content).__name__}; save a tensor [N, C, H, W], an "
        "(images, labels) pair or a dict with 'images' and 'labels'"
    )


# --------------------------------------------------------------------------------------------- measuring


def measure_checkpoints(
    factory: Callable[..., Any] | str,
    checkpoints: Iterable[str | os.PathLike] | str,
    probe: Any,
    transformations: Any,
    *,
    logdir: str | os.PathLike,
    factory_kwargs: dict[str, Any] | None = None,
    device: str | None = None,
    trust: bool = False,
    num_samples: int | None = None,
    data_dir: str | os.PathLike | None = None,
    progress: Callable[[str], None] | None = print,
    **monitor_keywords: Any,
) -> CheckpointReport:
    """Measure every checkpoint into the run directory ``logdir``, one logged step per checkpoint.

    ``factory``: a callable or ``"package.module:function"`` that builds the model from ``factory_kwargs``.
    ``checkpoints``: files, glob patterns or directories. ``probe``: anything ``Monitor`` takes, a ``.pt``
    file or a dataset name (see ``load_probe``). ``transformations``: a TransformationSet or its spelling,
    e.g. ``"rotations(16)"``. Other keywords go to ``Monitor`` (``measures``, ``layers``, ``batch_size``,
    ``actions``, ...); by default a probe with labels also logs accuracy per transformation. Checkpoints
    load with ``weights_only`` unless ``trust=True``. Returns what was measured and what was skipped, and why.
    """
    import torch

    from .expressions import parse_transformations
    from .monitor import Monitor
    from .probe import as_probe

    say = progress or (lambda message: None)
    logdir = Path(logdir)
    if logdir.is_dir() and any(logdir.glob("events.out.tfevents.*")):
        raise ValueError(
            f"{os.fspath(logdir)!r} already holds event files; measure into a new --logdir (measuring again "
            "into the same run would log every step twice)"
        )
    if isinstance(transformations, str):
        transformations = parse_transformations(transformations)
    paths = find_checkpoints([checkpoints] if isinstance(checkpoints, (str, os.PathLike)) else checkpoints)
    make = load_factory(factory) if isinstance(factory, str) else factory
    model = _build_model(make, dict(factory_kwargs or {}))
    model.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    samples = as_probe(load_probe(probe, data_dir=data_dir, num_samples=num_samples), num_samples=num_samples)
    probe = samples.images if samples.labels is None else (samples.images, samples.labels)

    report = CheckpointReport(logdir)
    steps: dict[Path, int] = {}
    for path in paths:  # the steps first (memory-mapped), to measure in step order
        try:
            steps[path] = checkpoint_step(_load(path, trust, lazily=True), path)
        except _Skip as reason:
            report.skipped.append((path, str(reason)))
            say(f"skipped {path}: {reason}")
    seen: dict[int, Path] = {}
    for path in sorted(steps, key=lambda p: steps[p]):
        if steps[path] in seen:
            reason = f"has step {steps[path]}, as {seen[steps[path]]} (measured) has"
            report.skipped.append((path, reason))
            say(f"skipped {path}: {reason}")
        else:
            seen[steps[path]] = path
    monitor = None
    started = time.perf_counter()
    try:
        for count, (step, path) in enumerate(seen.items(), 1):
            tick = time.perf_counter()
            try:
                model.load_state_dict(_fitted(_state_dict(_load(path, trust, lazily=False)), model))
            except _Skip as reason:
                report.skipped.append((path, str(reason)))
                say(f"[{count}/{len(seen)}] skipped {path}: {reason}")
                continue
            if monitor is None:  # made once a checkpoint fits, so a run of misfits writes nothing
                monitor = Monitor(model, probe, transformations, logdir=logdir, every=1, strict=True, **monitor_keywords)
            try:
                monitor.step(step, force=True)
            except Exception as error:  # a failing measurement (out of memory, NaN checks) skips this one
                report.skipped.append((path, f"measuring failed: {error!r}"))
                say(f"[{count}/{len(seen)}] skipped {path}: measuring failed: {error!r}")
                continue
            report.measured.append((path, step))
            elapsed = time.perf_counter() - started
            left = elapsed / count * (len(seen) - count)
            say(f"[{count}/{len(seen)}] {path}: step {step}, measured in {time.perf_counter() - tick:.1f} s"
                + (f" (about {left:.0f} s left)" if count < len(seen) else ""))
    finally:
        if monitor is not None:
            monitor.close()
    return report


# ------------------------------------------------------------------------------------------ command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``tm-tensorboard measure`` arguments."""
    parser.add_argument("checkpoints", nargs="+", help="checkpoint files, glob patterns (quoted) or directories")
    parser.add_argument("--factory", required=True,
                        help="package.module:function that builds the model, e.g. tm_tensorboard.examples.models:P4CNN")
    parser.add_argument("--arg", action="append", default=[], metavar="NAME=VALUE",
                        help="a keyword argument of the factory (a Python literal or a string); repeat for more")
    parser.add_argument("--probe", required=True,
                        help="a .pt file (a tensor, an (images, labels) pair, or a dict with images and labels), "
                        f"or a dataset: {', '.join(DATASETS)} (shapes needs no download)")
    parser.add_argument("--transformations", "-t", required=True,
                        help='the transformation set as in Python, e.g. "rotations(16)", "rot90()", '
                        '"product(rotations(8), flips())"')
    parser.add_argument("--logdir", required=True, help="the run directory to write (as Monitor(logdir=...))")
    parser.add_argument("--measures", default=None,
                        help="comma-separated measure groups (default: invariance,same_equivariance, plus "
                        "accuracy when the probe has labels)")
    parser.add_argument("--layers", action="append", default=None, metavar="PATTERN",
                        help="layers to measure (module names or glob patterns); repeat for more")
    parser.add_argument("--actions", action="append", default=[], metavar="[PATTERN=]ACTION",
                        help='feature action for the equivariance error, e.g. "features.*=cyclic_shift(4)"')
    parser.add_argument("--num-samples", type=int, default=None,
                        help=f"probe samples to use (default: all of a file, {DEFAULT_PROBE_SIZE} of a dataset)")
    parser.add_argument("--batch-size", type=int, default=16, help="probe samples per forward pass (default: 16)")
    parser.add_argument("--data-dir", default=None, help="where mnist / cifar10 files are (default: data/<name>)")
    parser.add_argument("--device", default=None, help="where to measure (default: cuda if available, else cpu)")
    parser.add_argument("--noise-floor", action="store_true", help="also measure the input itself (layer 'input')")
    parser.add_argument("--trust", action="store_true",
                        help="unpickle checkpoints that hold Python objects (only for files you trust)")


def measure_checkpoints_command(args: argparse.Namespace) -> int:
    """Run ``tm-tensorboard measure``: 0 when every checkpoint was measured, 1 when some were skipped."""
    from .expressions import parse_actions, parse_transformations

    keywords: dict[str, Any] = dict(batch_size=args.batch_size, noise_floor=args.noise_floor)
    if args.measures:
        keywords["measures"] = tuple(m.strip() for m in args.measures.split(",") if m.strip())
    if args.layers:
        keywords["layers"] = args.layers
    actions = parse_actions(args.actions)
    if actions is not None:
        keywords["actions"] = actions
    report = measure_checkpoints(
        args.factory,
        args.checkpoints,
        args.probe,
        parse_transformations(args.transformations),
        logdir=args.logdir,
        factory_kwargs=parse_kwargs(args.arg),
        device=args.device,
        trust=args.trust,
        num_samples=args.num_samples,
        data_dir=args.data_dir,
        progress=lambda message: print(message, flush=True),
        **keywords,
    )
    if not report.measured:
        print(f"tm-tensorboard measure: no checkpoint was measured ({len(report.skipped)} skipped, see above)",
              file=sys.stderr)
        return 1
    parent = Path(args.logdir).resolve().parent
    print(f"logged {len(report.measured)} checkpoint(s) to {args.logdir}"
          + (f", skipped {len(report.skipped)}" if report.skipped else "")
          + f"; see them with: tensorboard --logdir {parent}")
    return 1 if report.skipped else 0
