"""Collective traffic of one distributed measurement: states, not activations.

    python benchmarks/bench_distributed.py        # ~1 min: 2 gloo processes on this machine

Each rank measures the engine benchmark's reference model (4 convolutions, 13 observed modules,
3×32×32, N = 256, T = 16 rotations, invariance + same-equivariance + accuracy) on its half of the probe.
Every torch.distributed call the library makes is wrapped to count the bytes each rank contributes
(all-gathered state tensors, broadcast buffers, all-reduced accuracy, pickled status records), per call
kind; for scale, the bytes of the activations the same layers produce for the probe are reported too.
"""
from __future__ import annotations

import json
import math
import os
import pickle
import socket
import sys
from collections import defaultdict
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import tm_tensorboard as tm


class ReferenceCNN(nn.Module):
    """The engine benchmark's model: 13 leaf modules, flatten done in forward()."""

    def __init__(self):
        super().__init__()
        self.conv1, self.relu1 = nn.Conv2d(3, 32, 3, padding=1), nn.ReLU()
        self.conv2, self.relu2, self.pool1 = nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)
        self.conv3, self.relu3 = nn.Conv2d(32, 64, 3, padding=1), nn.ReLU()
        self.conv4, self.relu4, self.pool2 = nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)
        self.fc1, self.relu5, self.fc2 = nn.Linear(4096, 128), nn.ReLU(), nn.Linear(128, 10)

    def forward(self, x):
        x = self.pool1(self.relu2(self.conv2(self.relu1(self.conv1(x)))))
        x = self.pool2(self.relu4(self.conv4(self.relu3(self.conv3(x)))))
        return self.fc2(self.relu5(self.fc1(x.flatten(1))))


def _count(traffic: dict, kind: str, nbytes: int) -> None:
    traffic[kind]["calls"] += 1
    traffic[kind]["bytes"] += nbytes


def _instrument(traffic: dict) -> None:
    """Wrap the collectives the library calls so that each counts what this rank sends."""
    originals = {name: getattr(dist, name) for name in ("all_gather", "broadcast", "all_reduce", "all_gather_object")}

    def all_gather(parts, tensor, *a, **k):
        _count(traffic, "all_gather (states)", tensor.numel() * tensor.element_size())
        return originals["all_gather"](parts, tensor, *a, **k)

    def broadcast(tensor, *a, **k):
        _count(traffic, "broadcast (rank 0's buffers)", tensor.numel() * tensor.element_size())
        return originals["broadcast"](tensor, *a, **k)

    def all_reduce(tensor, *a, **k):
        _count(traffic, "all_reduce (accuracy)", tensor.numel() * tensor.element_size())
        return originals["all_reduce"](tensor, *a, **k)

    def all_gather_object(out, obj, *a, **k):
        _count(traffic, "all_gather_object (status)", len(pickle.dumps(obj)))
        return originals["all_gather_object"](out, obj, *a, **k)

    for name, function in (("all_gather", all_gather), ("broadcast", broadcast), ("all_reduce", all_reduce),
                           ("all_gather_object", all_gather_object)):
        setattr(dist, name, function)


def worker(rank: int, world: int, port: int, output: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = ReferenceCNN()
    images, labels = torch.rand(256, 3, 32, 32), torch.randint(0, 10, (256,))
    tset = tm.transforms.rotations(16)
    traffic: dict = defaultdict(lambda: {"calls": 0, "bytes": 0})
    _instrument(traffic)
    result = tm.measure(model, (images, labels), tset, measures=("invariance", "same_equivariance", "accuracy"))
    if rank == 0:
        activation_bytes = sum(256 * len(tset) * math.prod(result.layer_info(layer).unit_shape) * 4
                               for layer in result.layers)
        Path(output).write_text(json.dumps({
            "world_size": world,
            "layers": len(result.layers),
            "per_rank": dict(traffic),
            "per_rank_total_bytes": sum(v["bytes"] for v in traffic.values()),
            "activations_of_the_probe_bytes": activation_bytes,
        }, indent=2) + "\n")
    dist.destroy_process_group()


def main() -> None:
    output = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).parent / "results" / "distributed.json")
    output.parent.mkdir(parents=True, exist_ok=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(worker, args=(2, port, str(output)), nprocs=2, join=True)
    figures = json.loads(output.read_text())
    figures["load_average"] = os.getloadavg()
    output.write_text(json.dumps(figures, indent=2) + "\n")
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
