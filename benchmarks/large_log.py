"""A large synthetic log written by the SDK's own summary code, for the plugin and frontend benchmarks.

    python benchmarks/large_log.py DIR [--runs 20 --steps 1000 --layers 50 --units 512]

Every run gets the Monitor's configuration record and, at every step, what the Monitor writes for the
invariance measures and accuracy (snapshot blob, per-layer means, accuracy, scalars; no per-layer unit
tensors, ``unit_tensors=False``), with values drawn at random (seeded), through the Monitor's write
path (CRC32C in C). Runs are written by two processes.
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


def write_run(rundir: Path, steps: int, layers: int, units: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    tset = transforms.rotations(16)
    infos = [LayerInfo(f"block{i // 4}.layer{i % 4}", i, "Conv2d", (units,)) for i in range(layers)]
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
    args = parser.parse_args()
    start = time.perf_counter()
    jobs = [(Path(args.logdir) / f"run{r:02d}", args.steps, args.layers, args.units, r) for r in range(args.runs)]
    with multiprocessing.Pool(2) as pool:
        pool.starmap(write_run, jobs)
    size = sum(f.stat().st_size for f in Path(args.logdir).rglob("events.out.tfevents.*"))
    print(f"wrote {args.runs} runs x {args.steps} steps x {args.layers} layers x {args.units} units: "
          f"{size / 2**30:.2f} GiB in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
