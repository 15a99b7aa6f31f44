"""The summary format: the committed generated module matches the .proto; plugin data in and out."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2

from tm_tensorboard import metadata
from tm_tensorboard.proto import plugin_data_pb2

ROOT = Path(__file__).resolve().parents[1]


def test_generated_module_matches_proto(tmp_path):
    """Compile plugin_data.proto afresh and compare its descriptor with the committed *_pb2.py."""
    protoc = pytest.importorskip("grpc_tools.protoc")
    out = tmp_path / "descriptor.pb"
    status = protoc.main(
        ["protoc", f"-I{ROOT}", f"--descriptor_set_out={out}", "tm_tensorboard/proto/plugin_data.proto"]
    )
    assert status == 0
    fresh = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file[0]
    for message_type in fresh.message_type:  # protoc records json names; the runtime copy leaves them out
        for m in [message_type, *message_type.nested_type]:
            for field in m.field:
                field.ClearField("json_name")
    committed = descriptor_pb2.FileDescriptorProto()
    plugin_data_pb2.DESCRIPTOR.CopyToProto(committed)
    assert fresh == committed, "regenerate plugin_data_pb2.py (README: Summary format)"


def test_plugin_data_round_trip_and_summary_metadata():
    data = metadata.PluginData(
        kind=metadata.UNIT_VALUES,
        namespace="invariance",
        measure="nvi",
        layer=metadata.Layer(name="features.0", index=3, module_type="Conv2d", unit_shape=[32, 16, 16]),
        transformation_set_id="rotations(0,90);interpolation=bilinear;padding=border",
        probe_size=256,
        aggregation="channel",
    )
    summary_metadata = metadata.create_summary_metadata(data)
    assert summary_metadata.plugin_data.plugin_name == metadata.PLUGIN_NAME
    assert summary_metadata.data_class == 2  # DATA_CLASS_TENSOR
    parsed = metadata.parse_plugin_data(summary_metadata.plugin_data.content)
    assert parsed == data and parsed.version == metadata.PROTO_VERSION


@pytest.mark.parametrize(
    "content, pattern",
    [
        (b"\xff\xff\xff", "invalid"),
        (metadata.PluginData(version=metadata.PROTO_VERSION + 1, kind=1).SerializeToString(), "unsupported.*version"),
        (metadata.PluginData(version=0, kind=1).SerializeToString(), "unsupported.*version"),
        (metadata.PluginData(version=1).SerializeToString(), "without a kind"),
    ],
)
def test_parse_rejects_garbage_and_future_versions(content, pattern):
    with pytest.raises(ValueError, match=pattern):
        metadata.parse_plugin_data(content)


def test_tags_do_not_collide():
    assert metadata.unit_tag("invariance", "nvi", "conv1") == "invariance/nvi/conv1"
    assert metadata.means_tag("invariance", "nvi") == "invariance/nvi"
    assert metadata.scalar_tag("invariance", "nvi", "conv1") == "invariance_mean/nvi/conv1"
    assert len({metadata.means_tag("i", "nvi"), metadata.accuracy_tag("i"), metadata.config_tag("i")}) == 3


def test_shared_module_imports_no_torch():
    code = "import sys, tm_tensorboard.metadata; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
