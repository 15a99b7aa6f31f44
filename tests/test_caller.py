"""Warnings name the user's line that led to them, by measure(), by a Monitor and from inside the hooks
(``caller.py``)."""
from __future__ import annotations

import contextlib
import inspect
import warnings

import torch

import tm_tensorboard as tm
from tm_tensorboard.examples.models import SimpleCNN


@contextlib.contextmanager
def recording():
    """Every warning given inside, in a list."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield caught


def next_line() -> int:
    """The line after the caller's."""
    return inspect.currentframe().f_back.f_lineno + 1


def assert_here(caught: list[warnings.WarningMessage], line: int, match: str) -> None:
    found = [w for w in caught if match in str(w.message)]
    assert found, [str(w.message) for w in caught]
    for warning in found:
        assert (warning.filename, warning.lineno) == (__file__, line), (warning.filename, warning.lineno)


def model_and_probe():
    torch.manual_seed(0)
    return SimpleCNN(3, 10).eval(), torch.rand(32, 3, 32, 32)  # content at the border: the padding warning


def test_a_warning_of_measure_names_its_callers_line():
    model, probe = model_and_probe()
    with recording() as caught:
        line = next_line()
        tm.measure(model, probe, tm.transforms.rotations(5), error_bars=False)
    assert_here(caught, line, "content at their border")


def test_a_warning_of_a_monitor_names_the_line_that_made_it(tmp_path):
    model, probe = model_and_probe()
    with recording() as caught:
        line = next_line()
        monitor = tm.Monitor(model, probe, tm.transforms.rotations(5), logdir=tmp_path)
    monitor.close()
    assert_here(caught, line, "content at their border")


def test_a_warning_from_the_measures_of_a_layer_names_the_callers_line():
    model, probe = model_and_probe()
    with torch.no_grad():
        model.features[0].weight[0, 0] = float("nan")
    with recording() as caught:
        line = next_line()
        tm.measure(model, probe, tm.transforms.rotations(4), error_bars=False)
    assert_here(caught, line, "NaN in the measures")
