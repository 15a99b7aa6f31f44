"""PyTorch Lightning: measure invariance during ``Trainer.fit``, logged next to Lightning's own scalars.

    from tm_tensorboard.lightning import InvarianceCallback
    trainer = Trainer(callbacks=[InvarianceCallback(probe, tm.transforms.rotations(16), every=500)])

This module imports ``lightning``; ``import tm_tensorboard`` never does (it is the optional extra
``tm-tensorboard[lightning]``).
"""
from __future__ import annotations

import inspect
import os
import re
from typing import Any

try:
    from lightning.pytorch import Callback, LightningModule, Trainer
    from lightning.pytorch.loggers import TensorBoardLogger
    from lightning.pytorch.utilities import rank_zero_info
except ImportError as error:
    raise ImportError(
        "tm_tensorboard.lightning needs PyTorch Lightning (the `lightning` package): "
        "pip install tm-tensorboard[lightning]"
    ) from error

from .monitor import Monitor
from .transforms import TransformationSet

__all__ = ["InvarianceCallback"]

RUNS_DIRECTORY = "tm_invariance"  # under trainer.default_root_dir, when there is no TensorBoardLogger


def _next_version(root: str) -> str:
    """``root/version_N``, N one past the highest existing version (0 for none), as Lightning numbers runs."""
    names = os.listdir(root) if os.path.isdir(root) else []
    versions = [int(match.group(1)) for match in map(re.compile(r"version_(\d+)").fullmatch, names) if match]
    return os.path.join(root, f"version_{max(versions, default=-1) + 1}")


class InvarianceCallback(Callback):
    """Measures the LightningModule on ``probe`` every ``every`` optimizer steps (``trainer.global_step``).

    Takes ``Monitor``'s keywords except ``writer=``. With a ``TensorBoardLogger`` among the trainer's
    loggers the measures go into that logger's run, through its own SummaryWriter, so one run holds
    Lightning's scalars and the Invariance tab; otherwise (another logger, or none) into a run directory
    of their own, ``<default_root_dir>/tm_invariance/version_N``, named in a log line. ``logdir=`` picks
    that directory instead, also when there is a TensorBoardLogger.

    The LightningModule itself is measured (its ``forward``), so layers are named as in its
    ``named_modules()``: ``net.0`` for the first module of ``self.net = nn.Sequential(...)``; ``layers=``
    selects among them. Step 0 (the initial weights) and the last step of training are measured too, so
    the curves span the whole fit. Under DDP every rank measures its share of the probe and only rank 0
    writes, as with ``Monitor``. The Monitor is made in ``on_fit_start`` (with the model on its device),
    is ``self.monitor``, and is closed when training ends, also on an exception.
    """

    def __init__(
        self,
        probe: Any,
        transformations: TransformationSet,
        *,
        every: int = 500,
        logdir: str | os.PathLike | None = None,
        **monitor_kwargs: Any,
    ):
        if "writer" in monitor_kwargs:
            raise TypeError(
                "InvarianceCallback writes into the TensorBoardLogger's SummaryWriter or into a run directory "
                "of its own; choose that directory with logdir=, not writer="
            )
        # Unknown keywords fail here rather than when the fit starts.
        inspect.signature(Monitor).bind(None, probe, transformations, every=every, **monitor_kwargs)
        self._probe = probe
        self._transformations = transformations
        self._every = every
        self._kwargs = monitor_kwargs
        self.logdir = None if logdir is None else os.fspath(logdir)
        self.monitor: Monitor | None = None

    def _destination(self, trainer: Trainer) -> dict[str, Any]:
        """Monitor's ``writer=`` or ``logdir=`` for rank 0, saying where it writes."""
        if self.logdir is None:
            tensorboard = next((lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)), None)
            if tensorboard is not None:
                rank_zero_info(f"tm_tensorboard: invariance is logged into the run {tensorboard.log_dir}")
                writer = tensorboard.experiment
                writer._get_file_writer()  # reopens it after an earlier fit's logger.finalize(), as add_scalar does
                return {"writer": writer}
            # Chosen once: a later fit with this callback continues the same run.
            self.logdir = _next_version(os.path.join(trainer.default_root_dir, RUNS_DIRECTORY))
        rank_zero_info(f"tm_tensorboard: invariance is logged to its own run directory {self.logdir}")
        return {"logdir": self.logdir}

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        destination = self._destination(trainer) if trainer.is_global_zero else {}  # other ranks do not write
        self.monitor = Monitor(pl_module, self._probe, self._transformations, every=self._every, **destination,
                               **self._kwargs)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.global_step == 0:  # the weights training starts from (a resumed fit has them logged already)
            self.monitor.step(0)

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # global_step counts optimizer steps and already includes this batch's; under gradient
        # accumulation it repeats, and the Monitor measures a step only once.
        self.monitor.step(trainer.global_step)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.monitor.step(trainer.global_step, force=True)  # the final weights (a no-op if just measured)
        self._close()

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._close()

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._close()  # a fit that ended without on_train_end (nothing left to train)

    def _close(self) -> None:
        if self.monitor is not None:
            self.monitor.close()  # idempotent; the closed Monitor stays readable (layers, compile_seconds)
