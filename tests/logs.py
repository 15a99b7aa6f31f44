"""Reading logdirs back through TensorBoard's own readers, for the tests."""
from __future__ import annotations

import base64

import numpy as np
from tensorboard import context
from tensorboard.backend.event_processing import data_provider, plugin_event_multiplexer


def provider(logdir) -> data_provider.MultiplexerDataProvider:
    """A MultiplexerDataProvider over ``logdir`` keeping every step of every plugin."""
    multiplexer = plugin_event_multiplexer.EventMultiplexer(
        tensor_size_guidance={"tm_invariance": 0, "tm_invariance_units": 0, "scalars": 0}
    )
    multiplexer.AddRunsFromDirectory(str(logdir))
    multiplexer.Reload()
    return data_provider.MultiplexerDataProvider(multiplexer, str(logdir))


def ctx() -> context.RequestContext:
    return context.RequestContext()


def floats(text: str) -> np.ndarray:
    """Values a route sent as base64 of little-endian float32."""
    return np.frombuffer(base64.b64decode(text), dtype="<f4").astype(np.float64)


def rows(payload: dict) -> np.ndarray:
    """The [steps, width] values of a /layer_means or /accuracy payload."""
    values = floats(payload["values"])
    assert list(payload["shape"]) == [len(payload["steps"]), values.size // max(len(payload["steps"]), 1)]
    return values.reshape(payload["shape"])
