"""Error bars from interleaved shards of the probe: the full result unchanged, each jackknife replicate
what the probe without that shard measures, and standard errors that match the spread over independent
probes."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import tm_tensorboard as tm
from tm_tensorboard import engine
from tm_tensorboard import transforms as T
from tm_tensorboard.examples.models import VisionTransformer
from tm_tensorboard.measures import SPECS
from tm_tensorboard.shards import (DEFAULT_SHARDS, MIN_SHARD_SAMPLES, interleave, leave_out, moments_without,
                                  shard_count, standard_error, sum_without)
from tm_tensorboard.statistics import SampleMoments, SampleSum
from logs import rows
from models import small_cnn
from test_plugin_routes import client_for, get_json

MEASURES = ("invariance", "same_equivariance", "equivariance_error", "lie_rotation", "per_transformation")


def probe(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 8, 8, generator=g), torch.randint(0, 3, (n,), generator=g)


def test_shards_interleave_the_probe_and_have_enough_samples():
    order, bounds = interleave(10, 3)
    assert order.tolist() == [0, 3, 6, 9, 1, 4, 7, 2, 5, 8]
    assert bounds == [(0, 4), (4, 7), (7, 10)]
    assert shard_count(DEFAULT_SHARDS, 256) == 8
    assert shard_count(DEFAULT_SHARDS, 100) == 100 // MIN_SHARD_SAMPLES
    assert shard_count(DEFAULT_SHARDS, 2 * MIN_SHARD_SAMPLES - 1) == 1  # one shard: no error bars


@pytest.mark.usefixtures("kernels")  # with the eager and the compiled updates
@pytest.mark.parametrize("batch_size", [1, 5, 200])
def test_the_full_result_is_the_one_pass_result(batch_size):
    model, (images, labels) = small_cnn(), probe(64)
    kwargs = dict(measures=MEASURES, batch_size=batch_size)
    sharded = tm.measure(model, images, T.rotations(4), error_bars=True, **kwargs)
    single = tm.measure(model, images, T.rotations(4), error_bars=False, **kwargs)
    assert (sharded.shards, single.shards) == (4, 0)
    for measure in sharded.measures:
        for layer in sharded.layers_of(measure):
            np.testing.assert_allclose(sharded.get(measure, layer, per="element"), single.get(measure, layer, per="element"),
                                       rtol=1e-5, atol=1e-9, err_msg=f"{measure} {layer}")


def without_shard(model, images, labels, tset, k, shards, **kwargs):
    """The probe without shard k (samples k, k + K, ...) measured as a probe of its own."""
    keep = torch.arange(len(images)) % shards != k
    sub = (images[keep], None if labels is None else labels[keep])
    return tm.measure(model, sub if labels is not None else sub[0], tset, error_bars=False, **kwargs)


@pytest.mark.usefixtures("kernels")
@pytest.mark.parametrize("stratified", [False, True])
def test_standard_errors_are_the_jackknife_over_the_probe_without_each_shard(stratified):
    """The standard error is the delete-a-group jackknife over what the probe without each interleaved
    shard measures."""
    model, (images, labels) = small_cnn(seed=1), probe(48, seed=1)
    tset = T.rotations(4)
    measures = tuple(m for m in MEASURES if m != "lie_rotation") if stratified else MEASURES
    kwargs = dict(measures=measures, batch_size=7, stratified=stratified)
    result = tm.measure(model, (images, labels) if stratified else images, tset, error_bars=3, **kwargs)
    assert result.shards == 3
    alone = [without_shard(model, images, labels if stratified else None, tset, k, 3, **kwargs) for k in range(3)]
    for measure in result.measures:
        for layer in result.layers_of(measure):
            per_channel = np.array([a.get(measure, layer) for a in alone])
            # the jackknife scales the replicates' float rounding (~1e-9) by about K: atol 1e-7
            np.testing.assert_allclose(result.stderr(measure, layer, per="channel"), standard_error(per_channel),
                                       rtol=1e-5, atol=1e-7, err_msg=f"{measure} {layer}")
            dead = result.group_dead(measure, layer)
            if SPECS[measure].per_transformation:  # [T, channels]: a layer mean and its error per transformation
                means = [[np.mean(row[np.isfinite(row) & ~d]) for row, d in zip(v, dead)] for v in per_channel]
            else:
                means = [np.mean(v[np.isfinite(v) & ~dead]) for v in per_channel]
            np.testing.assert_allclose(result.stderr(measure, layer), standard_error(np.array(means)), rtol=1e-5,
                                       atol=1e-7)
    assert set(result.layer_stderrs("nvi")) == set(result.layers_of("nvi"))


@pytest.mark.usefixtures("kernels")
def test_token_layers_and_the_disk_reduce_per_channel_as_the_result_does():
    torch.manual_seed(0)
    vit = VisionTransformer(1, 5, width=0.25, depth=1).eval()
    images = torch.randn(32, 1, 12, 12)
    kwargs = dict(measures=("invariance", "same_equivariance"), actions=tm.actions.patch_grid(3, 3, cls_tokens=1))
    result = tm.measure(vit, images, T.rot90(), error_bars=2, **kwargs)
    alone = [without_shard(vit, images, None, T.rot90(), k, 2, **kwargs) for k in range(2)]
    for measure in ("nvi", "nvse"):
        for layer in result.layers_of(measure):
            expected = standard_error(np.array([a.get(measure, layer) for a in alone]))
            np.testing.assert_allclose(result.stderr(measure, layer, per="channel"), expected, rtol=1e-5, atol=1e-9)
    cnn, (images, _) = small_cnn(), probe(32)
    result = tm.measure(cnn, images, T.rot90(), measures=("equivariance_error",), disk=True, error_bars=2)
    alone = [without_shard(cnn, images, None, T.rot90(), k, 2, measures=("equivariance_error",), disk=True)
             for k in range(2)]
    for layer in result.layers_of("ee"):
        expected = standard_error(np.array([a.get("ee", layer) for a in alone]))
        np.testing.assert_allclose(result.stderr("ee", layer, per="channel"), expected, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "graph"])
def test_leaving_a_shard_out_in_place_is_the_rest_of_the_probe_bit_for_bit(compiled):
    """``leave_out`` turns each shard's state into the probe's without it in place: exactly what
    ``moments_without`` / ``sum_without`` compute, NaN, ±inf, a rest within rounding of 0 (made 0) and a
    shard that is the whole probe included."""
    g = torch.Generator().manual_seed(0)
    units, counts = 300, [16, 16, 96]  # the last shard holds every sample: nothing is left without it
    cpu = torch.device("cpu")
    moments, sums = SampleMoments((2, units), cpu), SampleSum((units,), cpu)
    moments.mean.copy_(torch.randn(2, units, dtype=torch.float64, generator=g))
    moments.m2.copy_(torch.rand(2, units, dtype=torch.float64, generator=g) * 50)
    sums.total.copy_(torch.rand(units, dtype=torch.float64, generator=g) * 50)
    moments.count.fill_(96)
    sums.count.fill_(96)
    moments.m2[0, :3], moments.mean[1, 3], sums.total[:2] = float("nan"), float("inf"), float("nan")
    shard_moments, shard_sums = [], []
    for n in counts:
        m, t = SampleMoments((2, units), cpu), SampleSum((units,), cpu)
        m.mean.copy_(moments.mean + 0.1 * torch.randn(2, units, dtype=torch.float64, generator=g))
        m.m2.copy_(moments.m2 * torch.rand(2, units, dtype=torch.float64, generator=g) / 3)
        t.total.copy_(sums.total * torch.rand(units, dtype=torch.float64, generator=g) / 3)
        m.count.fill_(n)
        t.count.fill_(n)
        shard_moments.append(m)
        shard_sums.append(t)
    shard_moments[0].m2[0, 5], shard_moments[0].mean[0, 5] = moments.m2[0, 5], moments.mean[0, 5]  # rest: 0
    shard_sums[0].total[5] = sums.total[5] * (1 - 1e-15)  # a rest within rounding of 0
    shard_sums[1].total[6] = float("-inf")
    expected = [(moments_without(moments.mean, moments.m2, moments.count, m.mean, m.m2, m.count),
                 sum_without(sums.total, sums.count, t.total, t.count)) for m, t in zip(shard_moments, shard_sums)]
    leave_out(moments, shard_moments, compiled)
    leave_out(sums, shard_sums, compiled)
    for (rest_moments, rest_sum), m, t in zip(expected, shard_moments, shard_sums):
        for ours, theirs in zip((m.mean, m.m2, m.count, t.total, t.count), (*rest_moments, *rest_sum)):
            assert torch.equal(ours.isnan(), theirs.isnan())
            assert torch.equal(torch.nan_to_num(ours, nan=0.0), torch.nan_to_num(theirs, nan=0.0))
    assert shard_moments[0].m2[0, 5] == 0 and shard_sums[0].total[5] == 0 and shard_moments[2].count == 0


def test_the_jackknife_of_a_mean_is_the_spread_of_the_shard_means_over_root_k():
    """For a mean (linear in the samples) the delete-a-group jackknife is the classic standard error of
    the mean from K equal groups: sd(group means) / √K."""
    rng = np.random.default_rng(0)
    samples = rng.normal(size=(8, 25))  # 8 shards of 25 samples
    groups = samples.mean(axis=1)
    leave_one_out = (samples.sum() - samples.sum(axis=1)) / (samples.size - 25)
    assert standard_error(leave_one_out) == pytest.approx(np.std(groups, ddof=1) / np.sqrt(8), rel=1e-12)
    assert np.isnan(standard_error(np.array([1.0, np.nan])))  # fewer than two finite replicates


def test_standard_error_matches_the_spread_over_independent_probes_and_shrinks_like_one_over_root_n():
    """Many independent probes from one distribution (fixed seeds): the spread of each layer's mean nvi
    over them, against the mean of the standard errors each probe reports about itself (jackknife:
    reported / actual 0.65 to 1.32 per layer at N = 64, 0.83 to 1.0 at N = 256; random groups, the
    estimator before it, reached 3.5 on the first ReLU, whose channels fire in a few samples only)."""
    torch.manual_seed(5)
    model = nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 6, 3, padding=1), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(24, 4)).eval()
    g = torch.Generator().manual_seed(11)
    spread, reported = {}, {}
    for n in (64, 256):
        means, errors = [], []
        for _ in range(24):
            images = torch.rand(n, 1, 6, 6, generator=g) + torch.rand(n, 1, 1, 1, generator=g)
            result = tm.measure(model, images, T.rotations(4), measures=("invariance",), batch_size=64, error_bars=True)
            assert result.shards == min(DEFAULT_SHARDS, n // MIN_SHARD_SAMPLES)
            means.append(list(result.layer_means("nvi").values()))
            errors.append(list(result.layer_stderrs("nvi").values()))
        spread[n], reported[n] = np.std(means, axis=0, ddof=1), np.mean(errors, axis=0)
        ratio = reported[n] / spread[n]
        assert 0.7 < np.median(ratio) < 1.4, (n, ratio)
        assert np.all((ratio > 0.6) & (ratio < 1.6)), (n, ratio)
    shrink = np.median(reported[256] / reported[64])
    assert 0.4 < shrink < 0.62, shrink  # 1/√4 = 0.5


def test_what_has_no_error_bars_says_why():
    model, (images, labels) = small_cnn(), probe(40)
    few = tm.measure(model, images[:20], T.rotations(4), measures=("invariance",), error_bars=True)
    assert few.shards == 0
    with pytest.raises(KeyError, match="a probe under two shards"):
        few.stderr("nvi", few.layers[0])
    off = tm.measure(model, images, T.rotations(4), measures=("invariance",), error_bars=False)
    assert off.shards == 0
    mixed = tm.measure(model, images, T.rotations(4), measures=("invariance", "anova", "goodfellow"), error_bars=True)
    assert mixed.shards == 2 and np.isfinite(mixed.stderr("nvi", mixed.layers[0]))
    for measure in ("anova_f", "gf"):
        with pytest.raises(KeyError, match="its group has none"):
            mixed.stderr(measure, mixed.layers[0])
    with pytest.raises(ValueError, match="per must be 'layer' or 'channel'"):
        mixed.stderr("nvi", mixed.layers[0], per="element")
    with pytest.raises(ValueError, match="error_bars must be None .when they fit., True, False or a number of shards"):
        tm.measure(model, images, T.rotations(4), error_bars=-1)


def test_error_bars_are_on_by_default_where_their_memory_is_small(monkeypatch, recwarn):
    """By default (error_bars=None) a probe of 2 × MIN_SHARD_SAMPLES samples or more gets error bars, unless
    the K more sets of states exceed AUTOMATIC_ERROR_BAR_BYTES or a memory_budget's single pass: then none,
    with a warning saying what they would cost. error_bars=True measures them anyway."""
    model, (images, _) = small_cnn(), probe(64)
    kwargs = dict(measures=("invariance",), batch_size=16)
    assert tm.measure(model, images, T.rotations(4), **kwargs).shards == 4
    assert not [w for w in recwarn if "error bars" in str(w.message)]
    states = tm.estimate_memory(model, images, T.rotations(4), error_bars=False, **kwargs).state_bytes
    monkeypatch.setattr(engine, "AUTOMATIC_ERROR_BAR_BYTES", 4 * states - 1)  # 4 shards: 4 more sets
    with pytest.warns(UserWarning, match=r"without error bars: their 4 shards' states would take .* more memory, more "
                                         r"than the .* automatic error bars may take; error_bars=True"):
        assert tm.measure(model, images, T.rotations(4), **kwargs).shards == 0
    assert tm.measure(model, images, T.rotations(4), error_bars=True, **kwargs).shards == 4
    monkeypatch.setattr(engine, "AUTOMATIC_ERROR_BAR_BYTES", 4 * states)
    assert tm.measure(model, images, T.rotations(4), **kwargs).shards == 4
    # under a budget, error bars go before a second pass over the probe would be needed
    report = tm.estimate_memory(model, images, T.rotations(4), error_bars=False, **kwargs)
    budget = report.working_bytes + report.state_bytes + states  # room for the states and one set more
    with pytest.warns(UserWarning, match="more than memory_budget leaves in one pass"):
        result = tm.measure(model, images, T.rotations(4), memory_budget=budget, **kwargs)
    assert result.shards == 0


def test_the_monitor_logs_the_standard_errors_the_routes_serve(tmp_path):
    """Each layer mean's standard error is logged with it (also per transformation) and served next to it."""
    model, (images, labels) = small_cnn(), probe(64)
    with tm.Monitor(model, images, T.rotations(4), logdir=tmp_path / "run", every=1,
                    measures=("invariance", "equivariance_error", "per_transformation"), error_bars=True) as monitor:
        results = {step: monitor.step(step) for step in (0, 5)}
    client = client_for(tmp_path)
    payload = get_json(client, "/layer_means", run="run", namespace="invariance", measure="nvi")
    assert payload["stderr"]["shards"] == 4 and payload["stderr"]["steps"] == [0, 5]
    expected = [list(results[step].layer_stderrs("nvi").values()) for step in (0, 5)]
    np.testing.assert_allclose(rows(payload["stderr"]), expected, rtol=1e-6)
    payload = get_json(client, "/per_transformation", run="run", namespace="invariance", measure="ie_t", step=5)
    expected = np.stack(list(results[5].layer_stderrs("ie_t").values()))
    np.testing.assert_allclose(np.array(payload["stderr"], dtype=float), expected, rtol=1e-6)
    assert int(get_json(client, "/config", run="run", namespace="invariance")["config"]["error_bars"]) == 4


def test_a_run_without_error_bars_serves_none(tmp_path):
    model, (images, _) = small_cnn(), probe(64)
    with tm.Monitor(model, images, T.rotations(4), logdir=tmp_path / "run", every=1, measures=("invariance",),
                    error_bars=False) as monitor:
        monitor.step(0)
    assert get_json(client_for(tmp_path), "/layer_means", run="run", namespace="invariance", measure="nvi")["stderr"] is None
