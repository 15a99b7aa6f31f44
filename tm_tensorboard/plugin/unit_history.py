"""One unit's values at every step of a snapshot series, read without reading every snapshot.

A snapshot blob holds every unit of every layer of a measure group at one step ([measures, units],
float32; ``metadata.decode_snapshot``), so a unit's history is 2 × 4 bytes (its value and its dead flag)
out of each of up to thousands of blobs of hundreds of kB. Asking the data provider for every blob costs
1-13 ms a blob under the Rust data server (``read_blob`` streams the whole blob over gRPC): seconds for
1,000 steps. So the blobs are found in the run's event files instead, where TensorBoard read them: each
file is scanned once for the series' records (the snapshot is the first value of its step's event, so a
record costs a few bytes of parsing) and the position of each step's blob kept, what a file gained
since being scanned in the next request; a history then reads 8 bytes per step.

Which steps exist is always the data provider's word (``read_blob_sequences``); the files only supply the
values of those steps, the last record of a step in file order winning, as in TensorBoard's data server
(``--load_fast=true``: a step written again replaces the steps from it on; the Python loader keeps both
records of such a step and its ``read_blob`` takes the first, so /units may show the older one there). A
step the files do not hold as expected (a logdir that is not a local directory, a blob of another size, a
file TensorBoard reads and this scan cannot) is read through the data provider's ``read_blob``, and left
out if that blob does not fit the series either. Nothing here trusts a length read from a file: every
offset is checked against the file's size, and a record that does not parse ends that file's scan.
"""
from __future__ import annotations

import mmap
import os
import struct
import threading
from dataclasses import dataclass, field

import numpy as np

from .. import metadata

_HEADER = 12  # uint64 length, uint32 masked CRC32C of the length
_FOOTER = 4  # uint32 masked CRC32C of the data
# Field numbers: Event.step, Event.summary, Summary.value, Summary.Value.tag, Summary.Value.tensor,
# TensorProto.dtype, TensorProto.string_val.
_EVENT_STEP, _EVENT_SUMMARY = 2, 5
_SUMMARY_VALUE = 1
_VALUE_TAG, _VALUE_TENSOR = 1, 8
_TENSOR_DTYPE, _TENSOR_STRING_VAL = 1, 8
_DT_STRING = 7


def _crc32c_table() -> list[int]:
    table = []
    for n in range(256):
        crc = n
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)
    return table


_CRC_TABLE = _crc32c_table()


def _masked_crc32c(data: bytes) -> int:
    """TFRecord's masked CRC32C (only ever of the 8 length bytes here: pure Python is fast enough)."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _CRC_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    crc ^= 0xFFFFFFFF
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(buffer, pos: int, end: int) -> tuple[int, int]:
    """(value, position after it) of the varint at ``pos``; ValueError past ``end`` or over 10 bytes."""
    if pos < end and buffer[pos] < 0x80:  # field keys: one byte
        return buffer[pos], pos + 1
    value = 0
    shift = 0
    while True:
        if pos >= end or shift > 63:
            raise ValueError("truncated or overlong varint")
        byte = buffer[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _fields(buffer, pos: int, end: int):
    """(field number, wire type, value or (start, end) of a length-delimited field) of a message's fields."""
    while pos < end:
        key, pos = _varint(buffer, pos, end)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buffer, pos, end)
            yield number, wire, value
            continue
        if wire == 2:
            length, pos = _varint(buffer, pos, end)
            start, pos = pos, pos + length
            value = (start, pos)
        elif wire == 1:
            value, pos = None, pos + 8
        elif wire == 5:
            value, pos = None, pos + 4
        else:
            raise ValueError(f"wire type {wire}")
        if pos > end:
            raise ValueError("field past the end of its message")
        yield number, wire, value


def _blob_in_tensor(buffer, start: int, end: int) -> tuple[int, int] | None:
    """(offset, length) of a DT_STRING tensor's only ``string_val``, else None."""
    dtype, found = None, []
    for number, wire, value in _fields(buffer, start, end):
        if number == _TENSOR_DTYPE and wire == 0:
            dtype = value
        elif number == _TENSOR_STRING_VAL and wire == 2:
            found.append(value)
    if dtype != _DT_STRING or len(found) != 1:
        return None
    return found[0][0], found[0][1] - found[0][0]


def _tagged_tensor(buffer, start: int, end: int, tag: bytes) -> tuple[int, int] | None:
    """(start, end) of a Summary.Value's tensor if its tag is ``tag``, else None."""
    named, tensor = False, None
    for number, wire, value in _fields(buffer, start, end):
        if number == _VALUE_TAG and wire == 2:
            named = buffer[value[0]:value[1]] == tag
            if not named:
                return None
        elif number == _VALUE_TENSOR and wire == 2:
            tensor = value
    return tensor if named else None


def _blob_in_event(buffer, start: int, end: int, tag: bytes) -> tuple[int, int, int] | None:
    """(step, blob offset, blob length) of the event's value with ``tag``, else None. The values of a
    summary are looked at until that tag's: the snapshot is the first value of the SDK's events."""
    step, blob = 0, None
    for number, wire, value in _fields(buffer, start, end):
        if number == _EVENT_STEP and wire == 0:
            step = value - (1 << 64) if value >= 1 << 63 else value
        elif number == _EVENT_SUMMARY and wire == 2 and blob is None:
            for inner, inner_wire, span in _fields(buffer, *value):
                if inner == _SUMMARY_VALUE and inner_wire == 2:
                    tensor = _tagged_tensor(buffer, *span, tag)
                    if tensor is not None:
                        blob = _blob_in_tensor(buffer, *tensor)
                        break
    return None if blob is None else (step, *blob)


def _scan(buffer, pos: int, size: int, tag: bytes) -> tuple[dict[int, tuple[int, int]], int]:
    """({step: (blob offset, length)} of the records with ``tag`` from ``pos``, position after the last
    complete record). Stops at a record that is incomplete (still being written) or that does not parse."""
    found = {}
    while pos + _HEADER <= size:
        header = bytes(buffer[pos:pos + _HEADER])
        (length,) = struct.unpack_from("<Q", header)
        if struct.unpack_from("<I", header, 8)[0] != _masked_crc32c(header[:8]):
            break  # not a record boundary: the rest of the file cannot be framed
        start, end = pos + _HEADER, pos + _HEADER + length
        if end + _FOOTER > size:
            break
        try:
            blob = _blob_in_event(buffer, start, end, tag)
        except (ValueError, IndexError):
            blob = None  # an event this scan cannot parse: its step is left to the data provider
        if blob is not None:
            step, offset, blob_length = blob
            found[step] = (offset, blob_length)
        pos = end + _FOOTER
    return found, pos


@dataclass
class _SeriesIndex:
    """Where one series' blobs are: per event file, how far it was scanned and its {step: blob}."""

    files: dict[str, tuple[int, dict[int, tuple[int, int]]]] = field(default_factory=dict)

    def blobs(self) -> dict[int, tuple[str, int, int]]:
        """{step: (file, offset, length)}, later files (in name order) winning."""
        out = {}
        for path in sorted(self.files):
            for step, (offset, length) in self.files[path][1].items():
                out[step] = (path, offset, length)
        return out


def _event_files(directory: str) -> list[str]:
    """The event files of one run directory, as TensorBoard's readers pick them ("tfevents" in the name)."""
    try:
        names = os.listdir(directory)
    except OSError:
        return []
    return sorted(os.path.join(directory, n) for n in names if "tfevents" in n and os.path.isfile(os.path.join(directory, n)))


def _mapped(path: str):
    """The file read-only in memory, or None if it is empty or cannot be opened. Without readahead: a
    scan reads the first page of each record of hundreds of kB, never the rest."""
    try:
        with open(path, "rb") as f:
            buffer = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except (OSError, ValueError):
        return None
    if hasattr(mmap, "MADV_RANDOM"):
        buffer.madvise(mmap.MADV_RANDOM)
    return buffer


def _read_float32s(path: str, positions: np.ndarray, needed: int) -> np.ndarray | None:
    """The little-endian float32s at byte ``positions`` of the file (None: unreadable or under ``needed`` bytes).
    Every page is asked for before any is read: pages not in the page cache come from the disk in parallel."""
    flat = positions.ravel().tolist()
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        if os.fstat(fd).st_size < needed:
            return None
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
            for position in flat:
                os.posix_fadvise(fd, position, 4, os.POSIX_FADV_WILLNEED)
        data = b"".join([os.pread(fd, 4, position) for position in flat])
    except OSError:
        return None
    finally:
        os.close(fd)
    if len(data) != 4 * len(flat):  # the file shrank meanwhile
        return None
    return np.frombuffer(data, dtype="<f4").reshape(positions.shape)


class UnitHistoryReader:
    """Reads one unit's history from a local logdir's event files; one per plugin, shared by requests."""

    def __init__(self, logdir: str | None):
        local = os.path.expanduser(logdir) if logdir and "://" not in logdir else None  # not gs://, s3://, ...
        self._logdir = os.path.realpath(local) if local and os.path.isdir(local) else None
        self._indexes: dict[tuple, _SeriesIndex] = {}
        self._lock = threading.Lock()

    def run_directory(self, run: str) -> str | None:
        """The directory of a run the data provider listed, if its name lies in the local logdir; resolved,
        as TensorBoard follows a run directory (or a parent) that is a symlink to elsewhere."""
        if self._logdir is None:
            return None
        named = os.path.normpath(os.path.join(self._logdir, run))
        if named != self._logdir and not named.startswith(self._logdir + os.sep):
            return None
        directory = os.path.realpath(named)
        return directory if os.path.isdir(directory) else None

    def _index(self, key: tuple, directory: str, tag: str) -> dict[int, tuple[str, int, int]]:
        """{step: (file, offset, length)} of the series, after scanning what the files gained since the
        last call (a file that shrank is scanned again from its start, a file gone is forgotten)."""
        with self._lock:
            index = self._indexes.setdefault(key, _SeriesIndex())
            paths = _event_files(directory)
            for path in set(index.files) - set(paths):
                del index.files[path]
            for path in paths:
                scanned, steps = index.files.get(path, (0, {}))
                try:
                    size = os.path.getsize(path)
                except OSError:
                    continue
                if size < scanned:  # rewritten from scratch
                    scanned, steps = 0, {}
                if size == scanned:
                    continue
                buffer = _mapped(path)
                if buffer is None:
                    continue
                try:
                    found, scanned = _scan(buffer, scanned, len(buffer), tag.encode())
                finally:
                    buffer.close()
                index.files[path] = (scanned, {**steps, **found})
            return index.blobs()

    def read(self, key: tuple, run: str, tag: str, steps: list[int], blob_size: int,
             offsets: list[int]) -> tuple[np.ndarray, list[int]]:
        """(values [len(offsets), len(steps)] float32, the steps the files could not give) of the float32s
        at byte ``offsets`` within each step's blob. NaN where a step is missing."""
        out = np.full((len(offsets), len(steps)), np.nan, dtype=np.float32)
        directory = self.run_directory(run)
        if directory is None:
            return out, list(steps)
        blobs = self._index(key, directory, tag)
        by_file: dict[str, list[tuple[int, int]]] = {}
        missing = []
        for i, step in enumerate(steps):
            found = blobs.get(step)
            if found is None or found[2] != blob_size:
                missing.append(step)
            else:
                by_file.setdefault(found[0], []).append((i, found[1]))
        for path, positions in by_file.items():
            columns, starts = np.array(positions, dtype=np.int64).T
            found = _read_float32s(path, starts[None, :] + np.array(offsets, dtype=np.int64)[:, None],
                                   int(starts.max()) + blob_size)
            if found is None:
                missing += [steps[i] for i in columns.tolist()]
            else:
                out[:, columns] = found
        return out, sorted(missing)


def unit_offsets(data: metadata.PluginData, measure: str, layer: str, unit: int) -> tuple[int, list[int], bool]:
    """(blob size in bytes, byte offsets of the unit's [measure, dead] values, whether a dead row exists);
    KeyError if the layer is not in the series, IndexError if it has no such unit."""
    names = [layer.name for layer in data.layers]
    position = names.index(layer) if layer in names else None
    if position is None:
        raise KeyError(layer)
    if not 0 <= unit < data.layers[position].num_units:
        raise IndexError(unit)
    total = sum(layer.num_units for layer in data.layers)
    column = sum(layer.num_units for layer in data.layers[:position]) + unit
    itemsize = metadata.SNAPSHOT_DTYPE.itemsize
    rows = [list(data.measures).index(measure)]
    has_dead = metadata.DEAD_ROW in data.measures
    if has_dead:
        rows.append(list(data.measures).index(metadata.DEAD_ROW))
    return len(data.measures) * total * itemsize, [(row * total + column) * itemsize for row in rows], has_dead
