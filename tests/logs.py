"""Reading logdirs back through TensorBoard's own readers, for the tests."""
from __future__ import annotations

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
