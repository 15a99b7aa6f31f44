"""Entry point of the ``tensorboard_plugins`` group: import-light, so TensorBoard always starts.

Only TensorBoard's base plugin module is imported here; the plugin (and its use of protobuf / numpy)
is imported when TensorBoard asks for it, and a failure there disables this plugin, not TensorBoard.
"""
from __future__ import annotations

import logging

from tensorboard.plugins import base_plugin

logger = logging.getLogger(__name__)

_PLUGIN_NAME = "tm_invariance"  # the same as tm_tensorboard.metadata.PLUGIN_NAME (checked by a test)


class InvarianceLoader(base_plugin.TBLoader):
    """Loads the Invariance tab; makes TensorBoard keep every step of its data unless told otherwise."""

    def fix_flags(self, flags) -> None:
        samples = getattr(flags, "samples_per_plugin", None)
        if isinstance(samples, dict):
            samples.setdefault(_PLUGIN_NAME, 0)  # 0 = keep all (the defaults keep 10 or 100 steps)

    def load(self, context: base_plugin.TBContext):
        try:
            from .invariance_plugin import InvariancePlugin
        except Exception:  # keep TensorBoard alive; say why the tab is missing
            logger.exception("tm-tensorboard: the Invariance plugin could not be loaded")
            return None
        return InvariancePlugin(context)
