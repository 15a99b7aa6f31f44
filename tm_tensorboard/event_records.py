"""Event-file records checksummed in C, for the SummaryWriters the Monitor writes through.

TensorBoard's writer frames each serialized Event as a TFRecord, ``uint64 length | uint32 masked CRC32C
of the length | data | uint32 masked CRC32C of the data`` (little-endian), and computes the CRC32C in
pure Python (~0.2 s per MiB, holding the GIL). ``accelerate`` switches one writer's record writer to
``CrcRecordWriter``, which writes the same bytes with google-crc32c's C implementation; nothing else
about the writer changes. ``write_summary`` writes a step's values as one Event serialized value by
value into chunks of CHUNK bytes, byte-identical to ``Event.SerializeToString()``, so that no single
call holds the GIL for long: building and serializing a 50 MB Event in one piece stalls every other
Python thread for a tenth of a second or more. Without the C implementation, or with writer internals
other than expected, writers stay TensorBoard's own: same bytes, slower.
"""
from __future__ import annotations

import struct
import threading
import warnings
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import numpy as np
from tensorboard.compat.proto import event_pb2, summary_pb2, tensor_pb2
from tensorboard.summary.writer.record_writer import RecordWriter

__all__ = ["BlobValue", "CrcRecordWriter", "EventRecord", "accelerate", "encode_event", "no_pause", "write_summary"]

CHUNK = 1 << 18  # bytes: copying or checksumming this much holds the GIL for well under a millisecond


def _c_crc32c():
    """google_crc32c if its C implementation is installed, else None."""
    try:
        with warnings.catch_warnings():  # it warns when only its own pure-Python fallback is there
            warnings.simplefilter("ignore")
            import google_crc32c
    except ImportError:
        return None
    return google_crc32c if google_crc32c.implementation == "c" else None


_crc32c = _c_crc32c()


def _masked(crc: int) -> int:
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
    """TFRecord's masked CRC32C of ``data``, in C (used only when google-crc32c's C code is there)."""
    return _masked(_crc32c.value(data))


def no_pause() -> None:
    """The default ``pace``: go on without pausing."""


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _field_header(message, name: str, length: int) -> bytes:
    """Key and length of the length-delimited field ``name`` of ``message`` holding ``length`` bytes."""
    number = message.DESCRIPTOR.fields_by_name[name].number
    return _varint(number << 3 | 2) + _varint(length)


_STRING_VAL = tensor_pb2.TensorProto.DESCRIPTOR.fields_by_name["string_val"].number


@dataclass(frozen=True)
class BlobValue:
    """A Summary.Value whose tensor's only ``string_val`` is ``payload``'s bytes, kept apart from the proto.

    ``value`` carries the tag, the metadata and the tensor's dtype and shape; the multi-MB payload (e.g.
    a unit snapshot) is never copied into a protobuf message: it is serialized in chunks.
    """

    value: summary_pb2.Summary.Value
    payload: np.ndarray  # C-contiguous; its bytes are the blob

    def __post_init__(self):
        late = [f.name for f, _ in self.value.tensor.ListFields() if f.number >= _STRING_VAL]
        if late or not self.payload.flags.c_contiguous:
            raise ValueError(f"a BlobValue's tensor must have only fields before string_val (has {late}) "
                             "and a C-contiguous payload")

    def proto(self) -> summary_pb2.Summary.Value:
        """The complete Summary.Value (payload copied in)."""
        value = summary_pb2.Summary.Value()
        value.CopyFrom(self.value)
        value.tensor.string_val.append(self.payload.tobytes())
        return value

    def serialized(self, pace: Callable[[], None]) -> list[bytes]:
        """``proto().SerializeToString()`` as pieces, the payload in CHUNK-sized ones."""
        head = summary_pb2.Summary.Value()
        head.CopyFrom(self.value)
        head.ClearField("tensor")
        head.ClearField("metadata")
        tail = summary_pb2.Summary.Value(metadata=self.value.metadata) if self.value.HasField("metadata") else None
        data = self.payload.reshape(-1).view(np.uint8)
        tensor = self.value.tensor.SerializeToString() + _field_header(self.value.tensor, "string_val", data.size)
        pieces = [head.SerializeToString() + _field_header(self.value, "tensor", len(tensor) + data.size) + tensor]
        for start in range(0, data.size, CHUNK):
            pieces.append(data[start : start + CHUNK].tobytes())
            pace()
        if tail is not None:
            pieces.append(tail.SerializeToString())
        return pieces


Value = summary_pb2.Summary.Value | BlobValue


class EventRecord:
    """One serialized Event as chunks of about CHUNK bytes, and whether the event file has it yet.

    ``pace`` is called between the chunks' writes.
    """

    def __init__(self, chunks: list[bytes], pace: Callable[[], None] = no_pause):
        self.chunks = chunks
        self.pace = pace
        self.size = sum(len(c) for c in chunks)
        self._written = threading.Event()
        self._error: BaseException | None = None

    def finish(self, error: BaseException | None = None) -> None:
        """Called by the writer thread once the record is written and flushed (or failed with ``error``)."""
        self._error = error
        self._written.set()

    def wait(self, worker: threading.Thread) -> None:
        """Until the event file's ``worker`` thread has written this record; its error, if any, is raised."""
        while not self._written.wait(0.1):
            if not worker.is_alive():
                raise OSError(f"TensorBoard's event writer thread stopped before writing the event: "
                              f"{getattr(worker, 'exception', None)!r}")
        if self._error is not None:
            raise self._error


def _coalesce(pieces: Iterable[bytes], pace: Callable[[], None]) -> list[bytes]:
    """Pieces joined into chunks of at least CHUNK bytes (pieces that large stay as they are)."""
    chunks: list[bytes] = []
    small: list[bytes] = []
    pending = 0
    for piece in pieces:
        if len(piece) >= CHUNK:
            if small:
                chunks.append(b"".join(small))
                small, pending = [], 0
            chunks.append(piece)
            continue
        small.append(piece)
        pending += len(piece)
        if pending >= CHUNK:
            chunks.append(b"".join(small))
            small, pending = [], 0
            pace()
    if small:
        chunks.append(b"".join(small))
    return chunks


def encode_event(values: Sequence[Value], step: int, wall_time: float,
                 pace: Callable[[], None] = no_pause) -> EventRecord:
    """``Event(wall_time, step, summary=Summary(value=values))`` serialized, byte for byte, value by value.

    Protobuf writes a message's fields in field-number order and a repeated field's elements one after
    the other, so the Event is its head fields, then the summary's header and each value's serialization.
    ``pace`` is called between pieces of work.
    """
    body: list[bytes] = []
    summary = summary_pb2.Summary()
    for value in values:
        pieces = value.serialized(pace) if isinstance(value, BlobValue) else [value.SerializeToString()]
        body.append(_field_header(summary, "value", sum(len(p) for p in pieces)))
        body.extend(pieces)
        pace()
    event = event_pb2.Event(wall_time=wall_time, step=int(step))
    head = event.SerializeToString() + _field_header(event, "summary", sum(len(p) for p in body))
    return EventRecord(_coalesce([head, *body], pace), pace)


class CrcRecordWriter(RecordWriter):
    """TensorBoard's RecordWriter with the CRC32C computed in C; also writes EventRecords chunk by chunk."""

    def write(self, data: bytes | EventRecord) -> None:
        if not isinstance(data, EventRecord):
            header = struct.pack("<Q", len(data))
            crcs = struct.pack("<I", masked_crc32c(header)), struct.pack("<I", masked_crc32c(data))
            self._writer.write(header + crcs[0] + data + crcs[1])
            return
        try:
            header = struct.pack("<Q", data.size)
            self._writer.write(header + struct.pack("<I", masked_crc32c(header)))
            crc = 0
            for chunk in data.chunks:  # file writes release the GIL between the checksum's steps
                crc = _crc32c.extend(crc, chunk)
                self._writer.write(chunk)
                data.pace()
            self._writer.write(struct.pack("<I", _masked(crc)))
            self._writer.flush()
        except BaseException as error:
            data.finish(error)
            raise
        data.finish()


def _async_writer(writer):
    """The _AsyncWriter of ``writer``'s event file if its records now go through CrcRecordWriter, else None.

    Switches the record writer (shared by the _AsyncWriter and its worker thread) to CrcRecordWriter the
    first time; leaves the writer as it is without the C CRC32C or if its internals are not as expected.
    """
    if _crc32c is None:
        return None
    try:
        async_writer = writer._get_file_writer().event_writer._async_writer
        record_writer = async_writer._writer
        shared = async_writer._worker._record_writer is record_writer
    except AttributeError:
        return None
    if type(record_writer) is RecordWriter and shared:
        record_writer.__class__ = CrcRecordWriter  # same state, same bytes; the next record uses it
    return async_writer if type(record_writer) is CrcRecordWriter else None


def accelerate(writer) -> bool:
    """Have ``writer`` (a torch SummaryWriter) checksum its records in C from now on; False if it cannot."""
    return _async_writer(writer) is not None


def write_summary(writer, values: Sequence[Value], step: int, wall_time: float,
                  pace: Callable[[], None] = no_pause) -> None:
    """Write ``values`` as one Event through ``writer`` and return once it is flushed to the event file.

    The record goes through the writer's own queue and thread, in order with the user's events, and
    waiting for it does not hold the writer's lock (``SummaryWriter.flush`` would block the user's
    ``add_scalar`` calls meanwhile). Without acceleration: TensorBoard's ``add_summary`` and ``flush``.
    """
    async_writer = _async_writer(writer)
    if async_writer is None:
        summary = summary_pb2.Summary(value=[v.proto() if isinstance(v, BlobValue) else v for v in values])
        writer._get_file_writer().add_summary(summary, step, wall_time)
        writer.flush()
        return
    record = encode_event(values, step, wall_time, pace)
    async_writer.write(record)
    record.wait(async_writer._worker)
