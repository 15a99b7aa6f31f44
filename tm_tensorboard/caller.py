"""Where a warning points: the user's line that led to it, whatever path inside the package it took.

A fixed ``stacklevel`` is right for one path only (``measure()``, ``Monitor.step``, a hook inside torch's
module call, a Lightning callback reach the same warning at different depths), and a wrong one names a line
of this package. ``stacklevel()`` counts the frames up to the first one outside this package, torch (whose
module calls run the hooks) and ``contextlib``.
"""
from __future__ import annotations

import contextlib
import os
import sys

__all__ = ["stacklevel"]

_PACKAGE = os.path.dirname(os.path.abspath(__file__)) + os.sep
_CONTEXTLIB = os.path.abspath(contextlib.__file__)


def _internal(filename: str) -> bool:
    torch = sys.modules.get("torch")  # (not imported here: the TensorBoard plugin's side runs without torch)
    torch_dir = os.path.dirname(os.path.abspath(torch.__file__)) + os.sep if torch is not None else None
    path = os.path.abspath(filename)
    return path.startswith(_PACKAGE) or path == _CONTEXTLIB or (torch_dir is not None and path.startswith(torch_dir))


def stacklevel() -> int:
    """The ``stacklevel`` for a ``warnings.warn`` made by the caller of this function that names the first frame
    outside the package (the last frame, where every frame is inside: a thread the package started)."""
    frame, level = sys._getframe(1), 1
    while frame.f_back is not None and _internal(frame.f_code.co_filename):
        frame, level = frame.f_back, level + 1
    return level
