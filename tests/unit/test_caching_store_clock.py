"""Caching building blocks: the sigma-keyed step clock (caching/clock.py), the per-chunk feature store and
reference inputs (caching/store.py), and the extrapolation history (caching/extrapolation.py)."""

from __future__ import annotations

import pytest
import torch

from preprint.caching.clock import StepClock
from preprint.caching.extrapolation import History
from preprint.caching.store import ChunkStore, ReferenceInputs

C, U, P = ("c", False), ("u", False), ("c", True)


# -- clock -----------------------------------------------------------------------------------------------------
def test_clock_accepts_a_single_step_run():
    """Two sigmas make one step: the smallest run a cache can serve."""
    c = StepClock([1.0, 0.0])
    assert c.steps == 1
    assert c.position(1.0) == 0.0 and c.position(0.25) == pytest.approx(0.75) and c.position(0.0) == 1.0


def test_clock_accepts_a_repeated_sigma():
    """The schedule must not *increase*: a repeated sigma (a flat stretch) is allowed, and a call at that sigma
    sits at the first step that has it (the flat-segment rule: sigma_i == sigma_{i+1} gives position i)."""
    c = StepClock(torch.tensor([2.0, 1.0, 1.0, 0.0]))
    assert c.steps == 3
    assert c.position(1.5) == pytest.approx(0.5)
    assert c.position(1.0) == 1.0
    assert c.position(0.5) == pytest.approx(2.5)


# -- store -----------------------------------------------------------------------------------------------------
def test_put_refuses_a_batch_that_does_not_split_into_one_chunk_per_key():
    """Storing a batch under keys it cannot be split evenly into raises instead of storing some chunks only."""
    s = ChunkStore()
    with pytest.raises(ValueError):
        s.put("b", [C, U, P], torch.zeros(4, 2))  # four rows chunk into two pieces, not three
    with pytest.raises(ValueError):
        s.put("b", [C, U], torch.zeros(1, 2))
    s.put("b", [C, U], torch.arange(4.0).reshape(2, 2))
    assert torch.equal(s.get("b", [U]), torch.tensor([[2.0, 3.0]]))


def test_has_checks_chunk_shape_dtype_and_device():
    """An entry is found only when its chunk shape, dtype and device match what the caller asks for."""
    s = ChunkStore()
    s.put("b", [C, U], torch.zeros(2, 3, dtype=torch.float16), tag="t")
    assert s.has("b", [C, U], "t", like=torch.Size([1, 3]), dtype=torch.float16, device=torch.device("cpu"))
    assert s.has("b", [C, U], "t", like=torch.Size([1, 3]))
    assert not s.has("b", [C, U], "t", like=torch.Size([2, 3]))
    assert s.has("b", [C, U], "t", dtype=torch.float16)
    assert not s.has("b", [C, U], "t", dtype=torch.float32)
    assert s.has("b", [C, U], "t", device=torch.device("cpu"))
    assert not s.has("b", [C, U], "t", device=torch.device("meta"))


def test_classify_refuses_a_batch_that_does_not_split_into_one_chunk_per_key():
    """Reference inputs are kept per chunk: a batch that does not split into one chunk per key raises."""
    with pytest.raises(ValueError):
        ReferenceInputs().classify([C, U, P], torch.zeros(4, 2), 0.0)  # four rows chunk into two pieces
    ref, x = ReferenceInputs(), torch.arange(4.0).reshape(2, 2)
    assert ref.classify([C, U], x, 0.0) == {C: "new", U: "new"}
    assert ref.classify([C, U], x, 0.0) == {C: "same", U: "same"}


# -- extrapolation history -------------------------------------------------------------------------------------
def test_history_order_must_be_at_least_one():
    """Order 0 would keep no value at all: refused."""
    with pytest.raises(ValueError, match="at least 1"):
        History(0)
    assert History(1).order == 1


def test_history_with_one_value_returns_it_bit_exactly():
    """With a single computed value the prediction is plain reuse: the value itself, in its own precision
    (a float64 stream is not rounded through float32)."""
    h = History(3)
    v = torch.tensor([1 / 3, 2 / 3, 1e-20], dtype=torch.float64)
    h.push(0.0, v)
    out = h.predict(5.0)
    assert out.dtype == torch.float64 and torch.equal(out, v)


@pytest.mark.parametrize("order", [2, 3])
def test_history_prediction_has_the_dtype_of_the_latest_value(order):
    """The prediction is accumulated in float32 and returned in the dtype of the most recent computed value."""
    h = History(order)
    for u in range(order - 1):
        h.push(float(u), torch.full((2,), float(u)))  # float32
    h.push(float(order - 1), torch.full((2,), float(order - 1), dtype=torch.float16))
    out = h.predict(float(order))
    assert out.dtype == torch.float16
    assert torch.equal(out, torch.full((2,), float(order), dtype=torch.float16))  # linear data: exact


def test_chunk_keys_under_tiled_diffusion_are_per_tile_position():
    """Tiled Diffusion puts n tiles side by side along the batch (each tile's chunks in turn): a cache must keep
    one stream per tile position, so a tile is compared with itself at the previous step, not with a neighbour."""
    from preprint.caching.store import TILES, chunk_keys

    plain = chunk_keys({"uuids": ["c", "u"]}, 2)
    assert plain == [("c", False), ("u", False)]
    tiles = [(0, 0, 8, 12), (0, 8, 8, 12)]
    keys = chunk_keys({"uuids": ["c", "u", "c", "u"], TILES: (tiles, 13, 22)}, 4)
    assert len(set(keys)) == 4
    assert keys[0] == (("c", tiles[0]), False) and keys[3] == (("u", tiles[1]), False)
    # the same tile at the next step gets the same keys; another position does not
    assert chunk_keys({"uuids": ["c", "u"], TILES: ([tiles[1]], 13, 22)}, 2) == keys[2:]
    assert chunk_keys({"uuids": ["c", "u"], TILES: ([(4, 4, 8, 12)], 13, 22)}, 2) != keys[2:]
