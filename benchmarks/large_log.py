"""A large synthetic log written by the SDK's own summary code, for the plugin and frontend benchmarks.

    python benchmarks/large_log.py DIR [--runs 20 --steps 1000 --layers 50 --units 512]
    python benchmarks/large_log.py DIR --model resnet50 --runs 4 --steps 200


Every run gets the Monitor's configuration record and, at every step, what the Monitor writes for the
invariance measures and accuracy (snapshot blob, per-layer means, accuracy, scalars; no per-layer unit
tensors, ``unit_tensors=False``), with values drawn at random (seeded), through the Monitor's write
path (CRC32C in C). Runs are written by two processes.

``--model resnet50`` takes the layers of a real network instead of ``--layers`` × ``--units``: those a
measurement of ``examples.models.ResNet50`` (width 1, 1,000 classes, 224 px) observes with
``dedupe_batchnorm=False`` (158 layers: 53 convolutions, 53 BatchNorms, 49 ReLUs, the pooling layers and
the classifier), with their names, module types and per-channel unit counts (64–2,048; 78,952 in all),
found by the SDK's discovery pass on the ``meta`` device (no weights, no forward of values).
"""
from __future__ import annotations

import argparse
import multiprocessing
import time
from pathlib import Path

import numpy as np
from torch.utils.tensorboard import SummaryWriter

from tm_tensorboard import __version__, metadata, transforms
from tm_tensorboard.capture import LayerInfo
from tm_tensorboard.measures import DEFINITIONS, MEASURE_GROUPS
from tm_tensorboard.result import MeasureResult
from tm_tensorboard.summary import SummaryEmitter, layer_proto, transformation_protos


def synthetic_layers(layers: int, units: int) -> list[LayerInfo]:
    """``layers`` convolutions of ``units`` units each, named ``block{i // 4}.layer{i % 4}``."""
    return [LayerInfo(f"block{i // 4}.layer{i % 4}", i, "Conv2d", (units,)) for i in range(layers)]


def resnet50_layers() -> list[LayerInfo]:
    """The 158 layers a measurement of ``examples.models.ResNet50`` (width 1, 224 px) observes without
    BatchNorm dedupe, in network order, each with its channels as units (the per-channel values logged)."""
    import torch

    from tm_tensorboard.engine import Measurement
    from tm_tensorboard.examples.models import ResNet50
    from tm_tensorboard.probe import Probe

    with torch.device("meta"):
        model = ResNet50(3, 1000)
    measurement = Measurement(model, transforms.rotations(16), measures=("invariance",), dedupe_batchnorm=False)
    found = measurement.discover(Probe(torch.empty(2, 3, 224, 224, device="meta"), None))
    return [LayerInfo(info.name, info.index, info.module_type, (info.num_channels,)) for info in found]


MODELS = {"resnet50": resnet50_layers}


def write_run(rundir: Path, steps: int, infos: list[LayerInfo], seed: int) -> None:
    rng = np.random.default_rng(seed)
    tset = transforms.rotations(16)
    layers = len(infos)
    writer = SummaryWriter(str(rundir))
    emitter = SummaryEmitter(writer, unit_tensors=False)
    emitter.write_config(
        metadata.RunConfig(
            library_version=__version__,
            transformation_set_id=tset.id,
            interpolation=tset.interpolation,
            padding=tset.padding,
            transformations=transformation_protos(tset),
            probe_size=256,
            layers=[layer_proto(info) for info in infos],
            measures=[metadata.plugin_data_pb2.MeasureDefinition(name=m, description=DEFINITIONS[m])
                      for m in (*MEASURE_GROUPS["invariance"], "accuracy")],
            every=100,
            batch_size=64,
            aggregation="channel",
        ),
        step=0,
    )
    depth = np.linspace(1.0, 0.05, layers)[:, None]  # invariance grows with depth, as in the papers
    for step in range(steps):
        progress = step / max(steps - 1, 1)
        components = {}
        for i, info in enumerate(infos):
            units = info.num_channels
            sv = rng.uniform(0.5, 1.5, units)
            tv = sv * np.clip(depth[i] * (1 - 0.5 * progress) + rng.normal(0, 0.05, units), 0, None)
            tv[:3], sv[:3] = 0.0, 0.0  # a few dead units
            components[info.name] = (("tv", "sv"), np.stack([tv, sv])[None])
        accuracy = np.clip(0.3 + 0.6 * progress + rng.normal(0, 0.02, len(tset)), 0, 1)
        result = MeasureResult(infos, tset, 256, {"invariance": components}, accuracy=accuracy)
        emitter.write_result(result, step)
    writer.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("logdir")
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--layers", type=int, default=50)
    parser.add_argument("--units", type=int, default=512)
    parser.add_argument("--model", choices=sorted(MODELS), default=None,
                        help="a real network's layers (names, types, channels) instead of --layers x --units")
    args = parser.parse_args()
    start = time.perf_counter()
    infos = MODELS[args.model]() if args.model else synthetic_layers(args.layers, args.units)
    jobs = [(Path(args.logdir) / f"run{r:02d}", args.steps, infos, r) for r in range(args.runs)]
    with multiprocessing.Pool(2) as pool:
        pool.starmap(write_run, jobs)
    size = sum(f.stat().st_size for f in Path(args.logdir).rglob("events.out.tfevents.*"))
    shape = (f"{args.model} ({len(infos)} layers, {sum(i.num_channels for i in infos):,} units)" if args.model
             else f"{args.layers} layers x {args.units} units")
    print(f"wrote {args.runs} runs x {args.steps} steps x {shape}: "
          f"{size / 2**30:.2f} GiB in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
