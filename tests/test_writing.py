"""The write path: C-checksummed records byte-identical to TensorBoard's, written off the training thread."""
from __future__ import annotations

import signal
import struct
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from tensorboard.compat.proto import summary_pb2, tensor_pb2, types_pb2
from tensorboard.summary.writer.record_writer import RecordWriter
from torch import nn
from torch.utils.tensorboard import SummaryWriter

import tm_tensorboard as tm
from tm_tensorboard import event_records, metadata
from logs import ctx, provider
from models import small_cnn

TESTS = Path(__file__).parent


def event_bytes(logdir: Path) -> bytes:
    (path,) = logdir.glob("events.out.tfevents.*")
    return path.read_bytes()


def split_records(data: bytes) -> tuple[list[bytes], bytes]:
    """The complete TFRecords of an event file (framing only) and the incomplete tail after them."""
    records, pos = [], 0
    while pos + 12 <= len(data):
        (length,) = struct.unpack_from("<Q", data, pos)
        end = pos + 12 + length + 4
        if end > len(data):
            break
        records.append(data[pos:end])
        pos = end
    return records, data[pos:]


def after_first_record(data: bytes) -> bytes:
    """An event file without its first record (the file-version event, stamped with the file's creation time)."""
    records, tail = split_records(data)
    return b"".join(records[1:]) + tail


def record_writer(writer: SummaryWriter):
    return writer.file_writer.event_writer._async_writer._writer


def monitor_like_values(megabytes: float = 2.0) -> list:
    """What a measured step holds: a multi-MB snapshot blob, a per-unit vector with metadata, a scalar."""
    rng = np.random.default_rng(0)
    data = metadata.PluginData(kind=metadata.UNIT_SNAPSHOT, namespace="invariance", measures=["tvi", "svi"])
    blob = summary_pb2.Summary.Value(tag="invariance/units/invariance",
                                     metadata=metadata.create_summary_metadata(data, blob_sequence=True))
    blob.tensor.dtype = types_pb2.DT_STRING
    blob.tensor.tensor_shape.dim.add(size=1)
    vector = rng.random(5000, dtype=np.float32).tobytes()
    units = summary_pb2.Summary.Value(
        tag="invariance/nvi/conv1", tensor=tensor_pb2.TensorProto(dtype=types_pb2.DT_FLOAT, tensor_content=vector)
    )
    units.tensor.tensor_shape.dim.add(size=5000)
    return [
        event_records.BlobValue(blob, rng.random((2, int(megabytes * 2**20) // 8), dtype=np.float32)),
        units,
        summary_pb2.Summary.Value(tag="invariance_mean/nvi/conv1", simple_value=0.25),
    ]


def write_sequence(writer: SummaryWriter, values: list, *, stock: bool) -> None:
    """The same events in the same order: user scalars, a multi-MB event of the user's, a measured step."""
    writer.add_scalar("loss", 0.5, 1, walltime=10.0)
    big = summary_pb2.Summary(value=[values[0].proto()])
    big.value[0].tag = "user/big"
    writer._get_file_writer().add_summary(big, 2, walltime=11.0)
    if stock:
        writer._get_file_writer().add_summary(summary_pb2.Summary(value=[values[0].proto(), *values[1:]]), 3, 12.0)
    else:
        event_records.write_summary(writer, values, 3, 12.0)
    writer.add_scalar("loss", 0.25, 4, walltime=13.0)
    writer.close()


def test_c_crc_records_are_byte_identical_to_tensorboards(tmp_path):
    values = monitor_like_values()
    stock, fast = SummaryWriter(str(tmp_path / "stock")), SummaryWriter(str(tmp_path / "fast"))
    assert event_records.accelerate(fast)
    assert type(record_writer(fast)) is event_records.CrcRecordWriter
    assert type(record_writer(stock)) is RecordWriter  # nothing global changed
    write_sequence(stock, values, stock=True)
    write_sequence(fast, values, stock=False)
    expected = event_bytes(tmp_path / "stock")
    assert len(expected) > 4 * 2**20 and len(split_records(expected)[0]) == 5
    assert after_first_record(event_bytes(tmp_path / "fast")) == after_first_record(expected)


def test_the_users_writer_keeps_writing_the_same_bytes_after_the_monitor(tmp_path):
    images = torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    user = SummaryWriter(str(tmp_path / "user"))
    with tm.Monitor(small_cnn(), images, tm.transforms.flips(), writer=user, every=1) as monitor:
        monitor.step(0)
    assert type(record_writer(user)) is event_records.CrcRecordWriter
    before = len(event_bytes(tmp_path / "user"))
    stock = SummaryWriter(str(tmp_path / "stock"))
    for writer in (user, stock):
        for step in range(3):
            writer.add_scalar("loss", 1.0 / (step + 1), step, walltime=100.0 + step)
        writer.add_text("note", "still the same bytes", 3, walltime=103.0)
        writer.close()
    assert event_bytes(tmp_path / "user")[before:] == after_first_record(event_bytes(tmp_path / "stock"))


def test_without_the_c_crc32c_writers_stay_tensorboards_with_the_same_bytes(tmp_path, monkeypatch):
    values = monitor_like_values(megabytes=1.0)
    write_sequence(SummaryWriter(str(tmp_path / "c")), values, stock=False)
    monkeypatch.setattr(event_records, "_crc32c", None)
    python = SummaryWriter(str(tmp_path / "python"))
    assert not event_records.accelerate(python)
    assert type(record_writer(python)) is RecordWriter
    write_sequence(python, values, stock=False)  # write_summary falls back to add_summary
    assert after_first_record(event_bytes(tmp_path / "python")) == after_first_record(event_bytes(tmp_path / "c"))


@pytest.mark.parametrize("missing", ["google_crc32c", "google_crc32c._crc32c"])  # the package, or its C code
def test_without_the_c_implementation_nothing_fails(tmp_path, missing):
    child = textwrap.dedent(f"""
        import sys, warnings
        sys.modules[{missing!r}] = None  # importing it raises ImportError
        sys.path.insert(0, {str(TESTS)!r})
        warnings.filterwarnings("error", module="google_crc32c")  # its warning about the slow fallback
        from torch.utils.tensorboard import SummaryWriter
        from tm_tensorboard import event_records
        from test_writing import monitor_like_values, write_sequence
        assert event_records._crc32c is None
        write_sequence(SummaryWriter(sys.argv[1]), monitor_like_values(megabytes=0.25), stock=False)
    """)
    subprocess.run([sys.executable, "-c", child, str(tmp_path / "python")], check=True, timeout=300)
    write_sequence(SummaryWriter(str(tmp_path / "c")), monitor_like_values(megabytes=0.25), stock=False)
    assert after_first_record(event_bytes(tmp_path / "python")) == after_first_record(event_bytes(tmp_path / "c"))


def hold_writes(monitor: tm.Monitor) -> tuple[threading.Event, threading.Event]:
    """Make the monitor's background writes wait for ``release``; ``started`` is set when one begins."""
    started, release = threading.Event(), threading.Event()
    write_result = monitor._emitter.write_result

    def held(result, step, **kwargs):
        started.set()
        assert release.wait(60)
        write_result(result, step, **kwargs)

    monitor._emitter.write_result = held
    return started, release


def test_training_goes_on_while_a_large_step_is_written(tmp_path):
    torch.manual_seed(0)
    wide = nn.Sequential(nn.Conv2d(3, 40_000, 1), nn.ReLU())  # 80,000 channels: a ~4.5 MB step
    probe = torch.randn(8, 3, 2, 2)
    monitor = tm.Monitor(wide, probe, tm.transforms.flips(), logdir=tmp_path / "run", every=1)
    started, release = hold_writes(monitor)
    result = monitor.step(1)
    assert result is not None and started.wait(60)  # step() returned; the writer thread holds the step

    model = small_cnn()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    loss = nn.functional.cross_entropy(model(torch.randn(8, 3, 8, 8)), torch.randint(0, 5, (8,)))
    loss.backward()
    optimizer.step()
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert not release.is_set()  # ... while the step was still being written

    closing = threading.Thread(target=monitor.close)
    closing.start()
    closing.join(0.5)
    assert closing.is_alive()  # close() waits for the write in flight
    release.set()
    closing.join(60)
    assert not closing.is_alive()

    assert len(event_bytes(tmp_path / "run")) > 4 * 10**6
    p = provider(tmp_path)
    blobs = p.read_blob_sequences(ctx(), experiment_id="", plugin_name=metadata.PLUGIN_NAME, downsample=10,
                                  run_tag_filter=None)["run"]
    series = p.list_blob_sequences(ctx(), experiment_id="", plugin_name=metadata.PLUGIN_NAME)["run"]
    for tag, datums in blobs.items():
        assert [d.step for d in datums] == [1]
        info = metadata.parse_plugin_data(series[tag].plugin_content)
        snapshot = metadata.decode_snapshot(p.read_blob(ctx(), blob_key=datums[0].values[0].blob_key), info)
        measure = info.measures[2]  # nvi / nvse
        for layer, values in zip(info.layers, snapshot[measure]):
            np.testing.assert_array_equal(values, result.get(measure, layer.name).astype(np.float32))


def test_the_user_can_log_while_a_step_is_being_written(tmp_path):
    images = torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    user = SummaryWriter(str(tmp_path / "run"))
    monitor = tm.Monitor(small_cnn(), images, tm.transforms.flips(), writer=user, every=1)
    event_file = user.file_writer.event_writer._general_file_writer
    write, in_record, release = event_file.write, threading.Event(), threading.Event()

    def write_then_hold(data):  # TensorBoard's writer thread stops inside the step's record
        write(data)
        in_record.set()
        assert release.wait(60)

    event_file.write = write_then_hold
    monitor.step(1)
    assert in_record.wait(60)
    logging = threading.Thread(target=user.add_scalar, args=("loss", 0.5, 1))
    logging.start()
    logging.join(30)
    assert not logging.is_alive()  # add_scalar is not blocked by the write in flight (no flush holds the lock)
    event_file.write = write
    release.set()
    monitor.close()
    user.close()
    scalars = provider(tmp_path).read_scalars(ctx(), experiment_id="", plugin_name="scalars", downsample=10,
                                              run_tag_filter=None)["run"]
    assert [d.step for d in scalars["loss"]] == [1] and [d.step for d in scalars["invariance_mean/nvi/0"]] == [1]


CRASHING_CHILD = """
import sys, time
import torch
sys.path.insert(0, {tests!r})
import tm_tensorboard as tm
from models import small_cnn

logdir, last_complete = sys.argv[1], int(sys.argv[2])
images = torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(0))
monitor = tm.Monitor(small_cnn(), images, tm.transforms.rotations(4), logdir=logdir, every=1)
event_file = monitor.writer.file_writer.event_writer._general_file_writer
write, writes = event_file.write, []

def write_half_of_the_record_then_hang(data):
    writes.append(data)
    if len(writes) == 2:  # the record's header is out: write half of its first chunk and stop there
        write(data[: len(data) // 2])
        print("HALF WRITTEN", flush=True)
        time.sleep(600)
    write(data)

write_result = monitor._emitter.write_result

def write_result_then_crash(result, step, **kwargs):
    if step == last_complete + 1:
        event_file.write = write_half_of_the_record_then_hang
    write_result(result, step, **kwargs)

monitor._emitter.write_result = write_result_then_crash
for step in range(1, last_complete + 2):
    monitor.step(step)
time.sleep(600)
"""


def test_a_crash_while_writing_a_step_keeps_every_step_before_it(tmp_path):
    logdir = tmp_path / "run"
    child = subprocess.Popen([sys.executable, "-c", CRASHING_CHILD.format(tests=str(TESTS)), str(logdir), "3"],
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "HALF WRITTEN"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(60)
    records, tail = split_records(event_bytes(logdir))
    assert len(records) == 5 and tail  # file version, configuration, steps 1-3; then half of step 4
    p = provider(tmp_path)
    everything = dict(experiment_id="", downsample=100, run_tag_filter=None)
    tensors = p.read_tensors(ctx(), plugin_name=metadata.UNITS_PLUGIN_NAME, **everything)["run"]
    blobs = p.read_blob_sequences(ctx(), plugin_name=metadata.PLUGIN_NAME, **everything)["run"]
    scalars = p.read_scalars(ctx(), plugin_name="scalars", **everything)["run"]
    assert tensors and blobs and scalars
    for series in (*tensors.values(), *blobs.values(), *scalars.values()):
        assert sorted(d.step for d in series) == [1, 2, 3]


EXITING_CHILD = """
import sys, time
import torch
sys.path.insert(0, {tests!r})
import tm_tensorboard as tm
from models import small_cnn

images = torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(0))
monitor = tm.Monitor(small_cnn(), images, tm.transforms.flips(), logdir=sys.argv[1], every=1)
write_result = monitor._emitter.write_result

def slow_write(result, step, **kwargs):
    time.sleep(1.0)  # still writing when the script ends
    write_result(result, step, **kwargs)

monitor._emitter.write_result = slow_write
monitor.step(1)  # and no close()
"""


def test_interpreter_exit_waits_for_the_step_being_written(tmp_path):
    subprocess.run([sys.executable, "-c", EXITING_CHILD.format(tests=str(TESTS)), str(tmp_path / "run")], check=True,
                   timeout=300)
    scalars = provider(tmp_path).read_scalars(ctx(), experiment_id="", plugin_name="scalars", downsample=10,
                                              run_tag_filter=None)["run"]
    assert [d.step for d in scalars["invariance_mean/nvi/0"]] == [1]


def failing_writes(monitor: tm.Monitor, steps: set[int]) -> None:
    write_result = monitor._emitter.write_result

    def write_or_fail(result, step, **kwargs):
        if step in steps:
            raise OSError("No space left on device (simulated)")
        write_result(result, step, **kwargs)

    monitor._emitter.write_result = write_or_fail


def test_a_failed_write_warns_at_the_next_step_and_at_close(tmp_path):
    images = torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    monitor = tm.Monitor(small_cnn(), images, tm.transforms.flips(), logdir=tmp_path / "run", every=1)
    failing_writes(monitor, {1, 3})
    assert monitor.step(1) is not None
    with pytest.warns(RuntimeWarning, match="writing step 1 failed.*No space left"):
        assert monitor.step(2) is not None  # training goes on, and step 2 is written
    assert monitor.step(3) is not None
    with pytest.warns(RuntimeWarning, match="writing step 3 failed.*No space left"):
        monitor.close()
    scalars = provider(tmp_path).read_scalars(ctx(), experiment_id="", plugin_name="scalars", downsample=10,
                                              run_tag_filter=None)["run"]
    assert [d.step for d in scalars["invariance_mean/nvi/0"]] == [2]


def test_a_failed_write_raises_when_strict(tmp_path):
    images = torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    monitor = tm.Monitor(small_cnn(), images, tm.transforms.flips(), logdir=tmp_path / "run", every=1, strict=True)
    failing_writes(monitor, {1, 3})
    monitor.step(1)
    with pytest.raises(RuntimeError, match="writing step 1 failed.*No space left") as raised:
        monitor.step(2)  # measured, then the failure was raised instead of handing step 2 over
    assert isinstance(raised.value.__cause__, OSError)
    monitor.step(3)
    with pytest.raises(RuntimeError, match="writing step 3 failed"):
        monitor.close()
