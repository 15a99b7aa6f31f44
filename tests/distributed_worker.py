"""One rank of a torch.distributed (gloo) job for tests/test_distributed.py.

    python tests/distributed_worker.py SCENARIO RANK WORLD PORT OUTDIR
"""
from __future__ import annotations

import os
import sys
import traceback
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))

import tm_tensorboard as tm  # noqa: E402
from models import small_cnn  # noqa: E402


def probe(n: int):
    g = torch.Generator().manual_seed(7)
    return torch.randn(n, 3, 8, 8, generator=g), torch.arange(n) % 3


def save(result: tm.MeasureResult, path: Path) -> None:
    arrays = {f"{m}|{layer}": result.get(m, layer, per="element") for m in result.measures for layer in result.layers_of(m)}
    if result.accuracy is not None:
        arrays["accuracy"] = result.accuracy
    np.savez(path, **arrays)


def save_stderrs(result: tm.MeasureResult, path: Path) -> None:
    """Each measure's standard errors, per channel and of each layer mean."""
    arrays = {}
    for m in result.measures:
        for layer in result.layers_of(m):
            arrays[f"{m}|{layer}|channel"] = result.stderr(m, layer, per="channel")
            arrays[f"{m}|{layer}|layer"] = np.array(result.stderr(m, layer))
    np.savez(path, **arrays)


def run(scenario: str, rank: int, world: int, out: Path) -> None:
    model = small_cnn(seed=3)
    if scenario == "measure":
        images, labels = probe(13)
        if rank:  # this rank's own BatchNorm statistics: the ranks measure (and derive "4" from "3") with rank 0's
            with torch.no_grad():
                model[4].running_var.fill_(4.0)
        both = ("invariance", "same_equivariance", "accuracy")
        # batch_size=1: the same forward batches as the single-process reference (float32 convolutions
        # round differently for different batch compositions, by ~1e-7 of the activations)
        save(tm.measure(model, (images, labels), tm.transforms.rotations(4), measures=both, batch_size=1),
             out / f"plain_{rank}.npz")
        save(tm.measure(model, (images, labels), tm.transforms.rotations(4), stratified=True, batch_size=1),
             out / f"stratified_{rank}.npz")
    elif scenario == "lie":  # the Lie derivatives' forward-mode pass: its states merge like the others
        images, labels = probe(13)
        lie = ("lie_rotation", "lie_translation_x", "lie_brightness", "invariance")
        save(tm.measure(model, images, tm.transforms.rotations(4), measures=lie, batch_size=1), out / f"lie_{rank}.npz")
        save(tm.measure(model, (images, labels), tm.transforms.rotations(4), measures=lie, stratified=True,
                        batch_size=1), out / f"lie_stratified_{rank}.npz")
    elif scenario == "error_bars":  # each error-bar shard split across the ranks, merged at its end
        images, labels = probe(32)
        for name, kwargs in (("plain", {}), ("stratified", {"stratified": True})):
            result = tm.measure(model, (images, labels), tm.transforms.rotations(4), batch_size=1, error_bars=2,
                                measures=("invariance", "lie_rotation"), **kwargs)
            save(result, out / f"bars_{name}_{rank}.npz")
            save_stderrs(result, out / f"bars_{name}_stderr_{rank}.npz")
    elif scenario == "passes":  # a memory budget that takes several passes over the probe, on every rank
        images, labels = probe(32)
        tset = tm.transforms.rotations(4)
        kw = dict(measures=("invariance", "same_equivariance", "accuracy"), batch_size=1, error_bars=2,
                  noise_floor=True, state_dtype=torch.float64)
        whole = tm.estimate_memory(model, (images, labels), tset, **kw)
        budget = whole.working_bytes + whole.state_bytes // 3
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            grouped = tm.measure(model, (images, labels), tset, memory_budget=budget, **kw)
        assert any("passes over the probe" in str(w.message) for w in caught), [str(w.message) for w in caught]
        save(grouped, out / f"passes_{rank}.npz")
        save_stderrs(grouped, out / f"passes_stderr_{rank}.npz")
        one = tm.measure(model, (images, labels), tset, **kw)
        save(one, out / f"one_{rank}.npz")
        save_stderrs(one, out / f"one_stderr_{rank}.npz")
    elif scenario == "small":  # fewer samples than ranks: one rank streams nothing
        images, labels = probe(2)
        save(tm.measure(model, images, tm.transforms.flips(), batch_size=1), out / f"small_{rank}.npz")
    elif scenario == "mismatch":
        images, _ = probe(6)
        tset = tm.transforms.rotations(4) if rank == 0 else tm.transforms.rotations(3)
        try:
            tm.measure(model, images, tset)
        except Exception as error:
            (out / f"error_{rank}.txt").write_text(f"{type(error).__name__}: {error}")
    elif scenario == "failure":  # one rank fails: every rank must hear of it instead of hanging
        images, _ = probe(6)
        if rank == 1:
            model[3].register_forward_hook(lambda m, i, o: (_ for _ in ()).throw(RuntimeError("out of memory on rank 1")))
        try:
            tm.measure(model, images, tm.transforms.flips())
        except Exception as error:
            (out / f"error_{rank}.txt").write_text(f"{type(error).__name__}: {error}")
    elif scenario == "train":
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        images, labels = probe(12)
        optimizer = torch.optim.SGD(ddp.parameters(), lr=0.1)
        monitor = tm.Monitor(ddp, (images, labels), tm.transforms.rotations(4), logdir=out / f"logs_{rank}" / "run",
                             every=2, measures=("invariance", "same_equivariance", "accuracy"))
        g = torch.Generator().manual_seed(100 + rank)
        for step in range(1, 7):
            x, y = torch.randn(8, 3, 8, 8, generator=g), torch.randint(0, 5, (8,), generator=g)
            loss = torch.nn.functional.cross_entropy(ddp(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if monitor.step(step) is not None and rank == 0:
                torch.save(model.state_dict(), out / f"weights_{step}.pt")
        monitor.close()
    else:
        raise ValueError(scenario)


def main() -> None:
    scenario, rank, world, port, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), Path(sys.argv[5])
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    status = 0
    try:
        run(scenario, rank, world, out)
    except Exception:
        traceback.print_exc()
        status = 1
    finally:
        dist.destroy_process_group()
    # Leave without the interpreter's teardown: after a rank's failure, a native thread still joinable at
    # exit made about one compiled "failure" run in ten end in std::terminate, after its results were written.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


if __name__ == "__main__":
    main()
