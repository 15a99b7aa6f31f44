"""Measuring under torch.distributed: ranks stream shards of the probe, states merge exactly.

Every rank holds the same probe and takes a contiguous shard of it. After streaming, the ranks first
exchange one small status record (success or the error, and what they measured) so that a failure or a
mismatch on one rank is reported on all of them instead of leaving the others waiting in a collective;
then each state's tensors are all-gathered and folded in rank order with the states' own ``merge`` (Chan's
formula), so every rank ends with the same, exact result. The collectives carry states, never activations.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch import nn

from .statistics import AccuracyState, StreamingState

__all__ = ["process_group", "exchange_status", "merge_state", "merge_accuracy", "is_writer", "rank0_buffers"]


def process_group() -> tuple[int, int] | None:
    """(rank, world size) when torch.distributed is initialized with more than one process, else None."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.get_rank(), dist.get_world_size()
    return None


def is_writer() -> bool:
    """Only rank 0 writes summaries."""
    group = process_group()
    return group is None or group[0] == 0


@contextlib.contextmanager
def rank0_buffers(model: nn.Module) -> Iterator[None]:
    """Measure the model as rank 0 holds it: between forward passes DDP ranks differ in their buffers
    (BatchNorm running statistics are broadcast from rank 0 only at the next forward). Each rank's own
    buffers are restored afterwards, so training goes on exactly as before."""
    buffers = [b for b in model.buffers() if b.is_floating_point() or b.dtype in (torch.int64, torch.int32)]
    saved = [b.clone() for b in buffers]
    try:
        for buffer in buffers:
            dist.broadcast(buffer, src=0)
        yield
    finally:
        with torch.no_grad():
            for buffer, own in zip(buffers, saved):
                buffer.copy_(own)


class RankMismatchError(ValueError):
    """The ranks measured different things (layers, transformations, probe) and cannot be merged."""


def exchange_status(error: BaseException | None, signature: Any) -> None:
    """All-gather every rank's outcome; raise on all ranks if any failed or the signatures differ."""
    record = (None if error is None else f"{type(error).__name__}: {error}", signature)
    records: list = [None] * dist.get_world_size()
    dist.all_gather_object(records, record)
    failed = [(rank, message) for rank, (message, _) in enumerate(records) if message is not None]
    if failed:
        if error is not None:
            raise error
        details = "; ".join(f"rank {rank}: {message}" for rank, message in failed)
        raise RuntimeError(f"measuring failed on another rank, so no rank has a result ({details})")
    signatures = [sig for _, sig in records]
    if any(sig != signatures[0] for sig in signatures):
        lines = [f"rank {rank}: {sig}" for rank, sig in enumerate(signatures)]
        raise RankMismatchError(
            "the ranks measured different things (every rank must pass the same model layers, transformations "
            "and full probe):\n" + "\n".join(lines)
        )


def _gather(tensor: torch.Tensor) -> list[torch.Tensor]:
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return parts


def merge_state(state: StreamingState, counts: list[int]) -> None:
    """Replace ``state`` by the merge of every rank's copy (rank r streamed ``counts[r]`` samples), folded
    in rank order with the state's own ``merge``."""
    tensors = state.tensors()
    flat = torch.cat([t.reshape(-1) for t in tensors])
    for rank, (count, part) in enumerate(zip(counts, _gather(flat))):
        pieces = [p.view_as(t) for p, t in zip(torch.split(part, [t.numel() for t in tensors]), tensors)]
        if rank == 0:
            state.load(count, pieces)
        else:
            state.merge(state.empty().load(count, pieces))


def merge_accuracy(state: AccuracyState, total: int) -> None:
    """Sum the correct counts of all ranks (``total`` = probe size)."""
    dist.all_reduce(state.correct, op=dist.ReduceOp.SUM)
    state.count = total
