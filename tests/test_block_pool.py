"""The pool that keeps a measurement's blocks above 32 MB under a memory budget (``block_pool.py``).

Each test runs in a child process: the pool becomes torch's CPU allocator there, and its counters start at 0.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from tm_tensorboard import block_pool

posix = pytest.mark.skipif(os.name != "posix", reason="the pool maps its blocks with mmap")

_PRELUDE = textwrap.dedent(
    """
    import json, os, resource, torch
    torch.set_num_threads(2)
    from tm_tensorboard import block_pool, heap

    MB = 2**20
    def faults():
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt

    def block(mb):  # a float32 tensor of mb MB, written
        return torch.ones(mb * MB // 4)

    def counters():
        return block_pool.statistics()
    """
)


def _child(body: str, **environment: str) -> dict:
    env = {**os.environ, **environment}
    done = subprocess.run([sys.executable, "-c", _PRELUDE + textwrap.dedent(body)], capture_output=True, text=True,
                          env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@posix
def test_freed_blocks_are_reused_within_the_cap():
    """While serving, a freed 48 MB block is kept and serves the next request of its size without a page fault;
    blocks in use at once may pass the cap, and once freed, no more than the cap stays mapped; smaller blocks,
    and blocks inside ``heap.mapped_apart`` (a measurement's states), are not the pool's; after serving, what
    it kept is unmapped, and a block still in use then is unmapped when freed."""
    out = _child(
        """
        out = {}
        with block_pool.serving(100 * MB) as served:
            out["served"] = served
            first = block(48)
            del first
            before = faults()
            second = block(48)  # the first one's pages
            out["faults_second"] = faults() - before
            out["second_sum"] = float(second.sum())
            del second
            zeros = torch.zeros(12 * MB)  # the same pages again, ones before: zeros are zeros all the same
            out["zeros_sum"] = float(zeros.sum())
            del zeros
            out["after_two"] = counters()
            held = [block(48) for _ in range(3)]  # 144 MB in use at once: more than the cap, never refused
            out["three_in_use"] = counters()
            del held
            out["three_freed"] = counters()
            small = block(4)
            out["small"] = counters()
            del small
            with heap.mapped_apart():
                states = block(48)
            out["apart"] = counters()
            kept_in_use = block(48)
        out["stopped"] = counters()
        del states, kept_in_use
        out["freed_after"] = counters()
        before = faults()
        outside = block(48)
        out["faults_outside"] = faults() - before
        print(json.dumps(out))
        """
    )
    assert out["served"] is True
    assert out["second_sum"] == 12 * 2**20 and out["zeros_sum"] == 0.0
    assert out["faults_second"] < 100  # against 12 k fresh pages outside (4 kB pages)
    assert out["faults_outside"] > 5000
    assert out["after_two"]["maps"] == 1 and out["after_two"]["reuses"] == 2
    assert out["after_two"]["kept_bytes"] == 48 * 2**20
    three = out["three_in_use"]
    assert three["held_bytes"] == 3 * 48 * 2**20 and three["kept_bytes"] == 0 and three["maps"] == 3
    freed = out["three_freed"]
    assert freed["held_bytes"] <= 100 * 2**20 and freed["kept_bytes"] == freed["held_bytes"] > 0
    assert freed["peak_bytes"] == 3 * 48 * 2**20
    assert out["small"]["maps"] == freed["maps"] and out["small"]["reuses"] == freed["reuses"]
    assert out["apart"]["maps"] == freed["maps"] and out["apart"]["reuses"] == freed["reuses"]
    assert out["stopped"]["kept_bytes"] == 0 and out["stopped"]["held_bytes"] == 48 * 2**20  # the one in use
    assert out["freed_after"]["held_bytes"] == 0
    assert out["stopped"]["installed"] == 1


@posix
def test_a_kept_block_serves_requests_of_half_its_size_or_more():
    """A request takes the smallest kept block that holds it if that is at most twice its size: an 80 MB block
    serves 44 MB, not 36 MB (then mapped anew)."""
    out = _child(
        """
        with block_pool.serving(2**30):
            big = block(80)
            del big
            start = counters()
            small = block(36)  # 80 > 2 × 36: a new block
            after_small = counters()
            del small
            medium = block(44)  # the 80 MB block (the 36 MB one is too small)
            after_medium = counters()
        print(json.dumps({"start": start, "small": after_small, "medium": after_medium}))
        """
    )
    assert out["small"]["maps"] == out["start"]["maps"] + 1 and out["small"]["reuses"] == out["start"]["reuses"]
    assert out["medium"]["maps"] == out["small"]["maps"] and out["medium"]["reuses"] == out["small"]["reuses"] + 1
    assert out["medium"]["kept_bytes"] == 36 * 2**20  # the 80 MB block in use by the 44 MB request


@posix
def test_forwards_served_by_the_pool_are_unchanged():
    """A model's forwards (convolutions: their scratch memory comes and goes through the allocator's raw
    interface too) give the same outputs served by the pool as without it, and page-fault far less."""
    out = _child(
        """
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Conv2d(3, 32, 3, padding=1), torch.nn.ReLU(),
                                    torch.nn.Conv2d(32, 32, 3, padding=1), torch.nn.MaxPool2d(2)).eval()
        x = torch.rand(64, 3, 96, 96)  # outputs of 72 MB

        def forwards():
            before = faults()
            with torch.no_grad():
                outputs = [model(x) for _ in range(3)]
            return outputs, faults() - before

        plain, plain_faults = forwards()
        with block_pool.serving(2**30):
            pooled, pooled_faults = forwards()
            counted = counters()
        print(json.dumps({"equal": all(torch.equal(a, b) for a, b in zip(plain, pooled)), "plain": plain_faults,
                          "pooled": pooled_faults, "counters": counted}))
        """
    )
    assert out["equal"]
    assert out["counters"]["reuses"] > 0
    assert out["pooled"] < out["plain"] / 2, out


@posix
def test_a_measurement_under_a_budget_is_served_and_exactly_the_same():
    """``tm.measure`` under a memory budget keeps its chunks' blocks above 32 MB in the pool (reused from the
    second chunk on, the pool's peak within the plan's working memory), and every number equals the same
    measurement's with the pool off (TM_TENSORBOARD_KEEP_FREED_MEMORY=0: blocks mapped apart as before)."""
    body = """
        import tm_tensorboard as tm
        from tm_tensorboard.engine import Measurement
        from tm_tensorboard.examples.models import SimpleCNN
        from tm_tensorboard.probe import as_probe

        torch.manual_seed(0)
        model, images = SimpleCNN(3, 10).eval(), torch.rand(12, 3, 64, 64)  # (first activations: 32 MB a chunk)
        tset = tm.transforms.rotations(16)
        session = Measurement(model, tset, batch_size=4, memory_budget="2GB", state_dtype=torch.float64,
                              error_bars=False)
        result = session.run(as_probe(images))
        values = {f"{m} {layer}": result.get(m, layer, per="element").tolist()
                  for m in ("nvi", "nvse") for layer in result.layers_of(m)}
        print(json.dumps({"values": values, "counters": counters(), "working": session._working_bytes}))
        """
    pooled = _child(body)
    plain = _child(body, TM_TENSORBOARD_KEEP_FREED_MEMORY="0")
    counted = pooled["counters"]
    assert counted["installed"] == 1 and counted["reuses"] > 0 and counted["kept_bytes"] == 0
    assert 0 < counted["peak_bytes"] <= pooled["working"]
    assert plain["counters"] == {}
    assert pooled["values"].keys() == plain["values"].keys() and len(pooled["values"]) > 4
    for key, values in pooled["values"].items():
        assert values == plain["values"][key], key


def test_switched_off_it_serves_nothing(monkeypatch):
    """TM_TENSORBOARD_KEEP_FREED_MEMORY=0 (the heap's switch) turns the pool off, without a warning."""
    monkeypatch.setenv("TM_TENSORBOARD_KEEP_FREED_MEMORY", "0")
    with block_pool.serving(2**30) as served:
        assert served is False
    assert block_pool.statistics() == {}


@posix
def test_without_a_compiler_it_warns_once_and_serves_nothing(tmp_path):
    """Where the pool cannot be built (no C++ compiler, nothing recorded), serving yields False and warns once,
    naming why: large blocks are then mapped apart by glibc as before."""
    out = _child(
        """
        import warnings
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            served = []
            for _ in range(2):
                with block_pool.serving(2**30) as s:
                    served.append(s)
                    block(48)
        print(json.dumps({"served": served, "warnings": [str(w.message) for w in caught], "counters": counters()}))
        """,
        CXX=str(tmp_path / "no-such-c++"), TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "inductor"),
    )
    assert out["served"] == [False, False] and out["counters"] == {}
    assert len(out["warnings"]) == 1 and "is not available" in out["warnings"][0], out["warnings"]
    assert "CppCompileError" in out["warnings"][0] or "no-such-c++" in out["warnings"][0], out["warnings"]
