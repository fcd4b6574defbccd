"""The DiT block cache's decisions and bookkeeping on tiny synthetic blocks (pure torch, no ComfyUI): stream
naming, the run's defaults and argument checks, the first-block criterion (residual, not output; strictly below
the threshold), what makes a call refresh every block (a new shape, another chunk size, another chunk order),
streams a block drops, blocks with too short a history, calls without sigmas or without a first block, and the
summary a run reports."""

from __future__ import annotations

import pytest
import torch

from preprint.caching.dit import DiTCacheRun, flat_streams
from preprint.caching.store import chunk_keys

KEYS = [("double_block", i) for i in range(4)]
BIG = 1e9  # a threshold no change reaches: skip whenever the run allows it


class LinearBlock:
    """Block k adds scale * (k + 1) * (1 + 0.5 sigma) to the img rows, scale 1 for uuid "c" (or a call without
    uuids), -3 for "u", times the row number within its chunk; txt gets 0.1 (k + 1) (1 + sigma). Every residual is
    linear in sigma, so order-2 extrapolation on an even sigma grid is exact."""

    def __init__(self, k: int):
        self.k, self.calls = k, 0

    @staticmethod
    def img_residual(k, sigma, uuids, batch):
        uuids = uuids or ["c"]
        per = batch // len(uuids)
        scale = torch.tensor([(1.0 if u == "c" else -3.0) * (j + 1) for u in uuids for j in range(per)])
        return scale.reshape(-1, 1, 1) * (k + 1) * (1.0 + 0.5 * sigma)

    def __call__(self, args: dict) -> dict:
        self.calls += 1
        to = args["transformer_options"]
        s = to["sigmas"][0].item()
        img, txt = args["img"], args["txt"]
        return {"img": img + self.img_residual(self.k, s, to.get("uuids"), img.shape[0]),
                "txt": txt + 0.1 * (self.k + 1) * (1.0 + s)}


def exact(x, txt, sigma, uuids=None, blocks=range(4)):
    """The uncached forward of LinearBlocks, computed from the formula."""
    img = x + sum(LinearBlock.img_residual(k, sigma, uuids, x.shape[0]) for k in blocks)
    return img, txt + sum(0.1 * (k + 1) * (1.0 + sigma) for k in blocks)


def forward(run, blocks, x, txt, sigma, uuids=None, skip_block=None):
    """One model call through the run; ``skip_block`` is a block index the model itself leaves out this call."""
    to = {"sigmas": torch.tensor([sigma] * x.shape[0])}
    if uuids is not None:
        to["uuids"] = list(uuids)
    args = {"img": x.clone(), "txt": txt.clone(), "transformer_options": to}
    for i, b in enumerate(blocks):
        if i != skip_block:
            args = {**args, **run.block(("double_block", i), args, b)}
    return args


def pattern(run, blocks, sigmas, make_x=lambda i: torch.zeros(2, 5, 3), uuids=("c", "u"), block=1):
    """F for a call that computed ``block``, S for one that predicted it."""
    out = ""
    for i, s in enumerate(sigmas):
        before = blocks[block].calls
        forward(run, blocks, make_x(i), torch.zeros(make_x(i).shape[0], 4, 3), s, uuids)
        out += "F" if blocks[block].calls > before else "S"
    return out


# -- streams ---------------------------------------------------------------------------------------------------
def test_flat_streams_names_tensors_and_tuple_elements_only():
    """A tensor is a stream; a tuple of tensors gives one stream per element; a tuple holding anything but
    tensors, an empty tuple or a missing entry gives none."""
    a, b = torch.zeros(1), torch.ones(1)
    assert list(flat_streams({"img": a, "txt": (a, b)})) == ["img", "txt.0", "txt.1"]
    assert flat_streams({"img": (a, "not a tensor")}) == {}
    assert flat_streams({"img": (a, None), "txt": []}) == {}
    assert flat_streams({"txt": None}) == {}


# -- the run's arguments ---------------------------------------------------------------------------------------
def test_negative_threshold_is_refused():
    with pytest.raises(ValueError, match="threshold must be >= 0"):
        DiTCacheRun([1.0, 0.0], KEYS, -0.5)


def test_defaults_are_linear_extrapolation_and_three_consecutive_skips():
    """Without ``order`` / ``max_skips`` the run uses the node's defaults, order 2 and 3: two full calls feed the
    linear extrapolation, then three skips, a forced full call, three skips (order 1 or 3 would need one or
    three full calls first; max 2 or 4 skips would force the full call earlier or later)."""
    sig = [1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.0]
    blocks = [LinearBlock(k) for k in range(4)]
    run = DiTCacheRun(sig, KEYS, BIG)
    assert pattern(run, blocks, sig[:-1]) == "FFSSSFSSS"


def test_threshold_zero_leaves_the_model_alone():
    """Threshold 0 is the uncached model: the run is inert, every block runs on the caller's own arguments, and
    nothing is counted or stored."""
    sig = [1.0, 0.8, 0.6, 0.0]
    blocks = [LinearBlock(k) for k in range(4)]
    run = DiTCacheRun(sig, KEYS, 0.0, order=1)
    assert run.inert
    x, txt = torch.randn(2, 5, 3), torch.zeros(2, 4, 3)
    for s in sig[:-1]:
        out = forward(run, blocks, x, txt, s, ["c", "u"])
        torch.testing.assert_close(out["img"], exact(x, txt, s, ["c", "u"])[0])
    assert all(b.calls == 3 for b in blocks)
    assert run.calls == 0 and run.counts.run == {} and run.history == {} and run.reference == {}


def test_summary_reports_skipped_calls_and_block_evaluations():
    """Threshold 1 (a cache that does skip), a first-block residual that does not change: the first call is
    full, the four after it skip blocks 1-3. Calls: 4 of 5 skipped; block evaluations: 5 + 3 run, 12 of 20 not
    run, 60%."""
    sig = [1.0, 0.8, 0.6, 0.4, 0.2, 0.0]

    class ConstantBlock(LinearBlock):
        def __call__(self, args):
            self.calls += 1
            return {"img": args["img"] + (self.k + 1), "txt": args["txt"]}

    blocks = [ConstantBlock(k) for k in range(4)]
    run = DiTCacheRun(sig, KEYS, 1.0, order=1, max_skips=10)
    assert not run.inert
    x, txt = torch.zeros(2, 5, 3), torch.zeros(2, 4, 3)
    for s in sig[:-1]:
        out = forward(run, blocks, x, txt, s, ["c", "u"])
        torch.testing.assert_close(out["img"], torch.full((2, 5, 3), 10.0))
    assert [b.calls for b in blocks] == [5, 1, 1, 1]
    assert run.calls == 5 and run.skipped_calls == 4
    assert run.counts.run == {KEYS[0]: 5, KEYS[1]: 1, KEYS[2]: 1, KEYS[3]: 1}
    assert run.counts.not_run == {KEYS[1]: 4, KEYS[2]: 4, KEYS[3]: 4}
    assert run.summary() == ("DiT block cache: 4/5 model calls skipped the blocks after the first; "
                             "60% of block evaluations skipped")


# -- the first-block criterion ---------------------------------------------------------------------------------
def test_criterion_is_the_first_blocks_residual_not_its_output():
    """The input moves by 10 per call while every residual stays the same: the first block's residual (output
    minus input) has not changed, so every call after the first skips, at threshold 0.05."""
    sig = [1.0, 0.8, 0.6, 0.4, 0.2, 0.0]

    class ConstantBlock(LinearBlock):
        def __call__(self, args):
            self.calls += 1
            return {"img": args["img"] + (self.k + 1), "txt": args["txt"]}

    blocks = [ConstantBlock(k) for k in range(4)]
    run = DiTCacheRun(sig, KEYS, 0.05, order=1, max_skips=10)
    assert pattern(run, blocks, sig[:-1], make_x=lambda i: torch.full((2, 5, 3), 10.0 * i)) == "FSSSS"


@pytest.mark.parametrize("threshold,expected", [(0.5, "FF"), (0.5 + 1e-6, "FS")])
def test_a_change_equal_to_the_threshold_refreshes(threshold, expected):
    """The first block's residual doubles from the first call to the second: relative L1 change |2 - 1| / 2 =
    0.5 exactly. A call skips only when the change is strictly below the threshold ('changed less than the
    threshold'), so 0.5 refreshes and 0.5 + 1e-6 skips."""

    class DoublingBlock(LinearBlock):
        def __call__(self, args):
            self.calls += 1
            s = args["transformer_options"]["sigmas"][0].item()
            return {"img": args["img"] + (1.0 if s == 1.0 else 2.0), "txt": args["txt"]}

    blocks = [DoublingBlock(k) for k in range(4)]
    run = DiTCacheRun([1.0, 0.5, 0.0], KEYS, threshold, order=1, max_skips=10)
    assert pattern(run, blocks, [1.0, 0.5]) == expected


def test_a_first_block_that_changes_its_streams_shape_never_lets_a_call_skip():
    """A first block whose output is not its input plus a residual (here it doubles the channels) gives no
    criterion: every call computes every block."""

    class Widening(LinearBlock):
        def __call__(self, args):
            self.calls += 1
            return {"img": torch.cat([args["img"], args["img"]], dim=-1) + 1.0, "txt": args["txt"]}

    class Plain(LinearBlock):
        def __call__(self, args):
            self.calls += 1
            return {"img": args["img"] + (self.k + 1), "txt": args["txt"]}

    sig = [1.0, 0.8, 0.6, 0.4, 0.0]
    blocks = [Widening(0)] + [Plain(k) for k in range(1, 4)]
    run = DiTCacheRun(sig, KEYS, BIG, order=1, max_skips=10)
    x, txt = torch.zeros(2, 5, 3), torch.zeros(2, 4, 3)
    for s in sig[:-1]:
        out = forward(run, blocks, x, txt, s, ["c", "u"])
        torch.testing.assert_close(out["img"], torch.full((2, 5, 6), 10.0))  # 1 + 2 + 3 + 4
    assert [b.calls for b in blocks] == [4, 4, 4, 4] and run.skipped_calls == 0


# -- what refreshes every block ---------------------------------------------------------------------------------
@pytest.mark.parametrize("stream", ["img", "txt"])
def test_a_new_token_count_refreshes_every_block_and_caching_resumes(stream):
    """Four calls at one resolution (or prompt length), six at another: the first call at the new shape and the
    one after it are full (linear extrapolation needs two residuals of that shape), then the calls skip again.
    Every output is the uncached one."""
    sig = [1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.0]
    blocks = [LinearBlock(k) for k in range(4)]
    run = DiTCacheRun(sig, KEYS, BIG, order=2, max_skips=10)
    got = ""
    for i, s in enumerate(sig[:-1]):
        wide = i >= 4
        x = torch.zeros(2, 7 if wide and stream == "img" else 5, 3)
        txt = torch.zeros(2, 6 if wide and stream == "txt" else 4, 3)
        before = blocks[1].calls
        out = forward(run, blocks, x, txt, s, ["c", "u"])
        got += "F" if blocks[1].calls > before else "S"
        want_img, want_txt = exact(x, txt, s, ["c", "u"])
        torch.testing.assert_close(out["img"], want_img)
        torch.testing.assert_close(out["txt"], want_txt)
    assert got == "FFSSFFSSSS"


def test_a_cond_chunk_keeps_its_cache_when_the_batch_is_split():
    """ComfyUI may run cond and uncond batched or one by one (memory): a chunk's cache is per chunk, so the cond
    chunk, run alone after two batched calls, is predicted (exactly: linear residuals)."""
    sig = [1.0, 0.8, 0.6, 0.0]
    blocks = [LinearBlock(k) for k in range(4)]
    run = DiTCacheRun(sig, KEYS, BIG, order=2, max_skips=10)
    x2, txt2 = torch.zeros(2, 5, 3), torch.zeros(2, 4, 3)
    for s in sig[:2]:
        forward(run, blocks, x2, txt2, s, ["c", "u"])
    assert blocks[1].calls == 2
    x1, txt1 = torch.zeros(1, 5, 3), torch.zeros(1, 4, 3)
    out = forward(run, blocks, x1, txt1, sig[2], ["c"])
    assert blocks[1].calls == 2 and run.skipped_calls == 1  # predicted
    want_img, want_txt = exact(x1, txt1, sig[2], ["c"])
    torch.testing.assert_close(out["img"], want_img)
    torch.testing.assert_close(out["txt"], want_txt)


def test_a_chunk_with_more_samples_refreshes_every_block():
    """Two calls with one sample in the cond chunk, then one with two (rows 1 and 2 get different residuals):
    the cached residuals are of one sample, so the call computes every block."""
    sig = [1.0, 0.8, 0.6, 0.0]
    blocks = [LinearBlock(k) for k in range(4)]
    run = DiTCacheRun(sig, KEYS, BIG, order=2, max_skips=10)
    for s in sig[:2]:
        forward(run, blocks, torch.zeros(1, 5, 3), torch.zeros(1, 4, 3), s, ["c"])
    x, txt = torch.zeros(2, 5, 3), torch.zeros(2, 4, 3)
    out = forward(run, blocks, x, txt, sig[2], ["c"])
    assert blocks[1].calls == 3 and run.skipped_calls == 0
    torch.testing.assert_close(out["img"], exact(x, txt, sig[2], ["c"])[0])


def test_chunks_keep_their_cache_when_their_order_in_the_batch_changes():
    """Cond and uncond swap places in the batch on every other call: each chunk's residuals follow its uuid, so
    the predicted calls are exact (uncond's residual is -3 times cond's)."""
    sig = [1.0, 0.8, 0.6, 0.4, 0.2, 0.0]
    blocks = [LinearBlock(k) for k in range(4)]
    run = DiTCacheRun(sig, KEYS, BIG, order=2, max_skips=10)
    txt = torch.zeros(2, 4, 3)
    for i, s in enumerate(sig[:-1]):
        uuids = ["c", "u"] if i % 2 == 0 else ["u", "c"]
        x = torch.zeros(2, 5, 3)
        out = forward(run, blocks, x, txt, s, uuids)
        torch.testing.assert_close(out["img"], exact(x, txt, s, uuids)[0])
    assert run.skipped_calls == 3 and blocks[1].calls == 2


# -- streams a block drops --------------------------------------------------------------------------------------
def test_a_stream_the_last_block_drops_is_dropped_on_skipped_calls():
    """SD3's last joint block returns the context as None: on skipped calls that block is predicted too, its
    image stream extrapolated and its context None again."""

    class DropsTxt(LinearBlock):
        def __call__(self, args):
            return {**super().__call__(args), "txt": None}

    sig = [1.0, 0.8, 0.6, 0.4, 0.2, 0.0]
    blocks = [LinearBlock(k) for k in range(3)] + [DropsTxt(3)]
    run = DiTCacheRun(sig, KEYS, BIG, order=2, max_skips=10)
    x, txt = torch.zeros(2, 5, 3), torch.zeros(2, 4, 3)
    for s in sig[:-1]:
        out = forward(run, blocks, x, txt, s, ["c", "u"])
        assert out["txt"] is None
        torch.testing.assert_close(out["img"], exact(x, txt, s, ["c", "u"])[0])
    assert [b.calls for b in blocks] == [5, 2, 2, 2]


def test_streams_are_cached_independently_of_a_dropped_one():
    """Block 2 drops the image stream and keeps the text; block 3 then sees only text. Skipped calls predict
    block 2's text (and its image as None) and block 3's text: the final text is the uncached one."""

    class DropsImg(LinearBlock):
        def __call__(self, args):
            return {**super().__call__(args), "img": None}

    class TxtOnly(LinearBlock):
        def __call__(self, args):
            self.calls += 1
            s = args["transformer_options"]["sigmas"][0].item()
            assert args["img"] is None
            return {"txt": args["txt"] + 0.1 * (self.k + 1) * (1.0 + s)}

    sig = [1.0, 0.8, 0.6, 0.4, 0.2, 0.0]
    blocks = [LinearBlock(0), LinearBlock(1), DropsImg(2), TxtOnly(3)]
    run = DiTCacheRun(sig, KEYS, BIG, order=2, max_skips=10)
    x, txt = torch.zeros(2, 5, 3), torch.zeros(2, 4, 3)
    for s in sig[:-1]:
        out = forward(run, blocks, x, txt, s, ["c", "u"])
        assert out["img"] is None
        torch.testing.assert_close(out["txt"], exact(x, txt, s, ["c", "u"])[1])
    assert [b.calls for b in blocks] == [5, 2, 2, 2]


def test_a_block_that_drops_its_only_stream_is_predicted_as_dropping_it():
    """A block whose only stream is the text, returned as None: on a skipped call it is not run, and its text
    is None again."""
    sig = [1.0, 0.8, 0.6, 0.0]
    run = DiTCacheRun(sig, KEYS[:2], BIG, order=1, max_skips=10)
    first = LinearBlock(0)
    calls = []

    def drops_txt(args):
        calls.append(1)
        return {"txt": None}

    for s in sig[:-1]:
        to = {"sigmas": torch.tensor([s, s]), "uuids": ["c", "u"]}
        x, txt = torch.zeros(2, 5, 3), torch.zeros(2, 4, 3)
        run.block(KEYS[0], {"img": x, "txt": txt, "transformer_options": to}, first)
        out = run.block(KEYS[1], {"txt": txt, "transformer_options": to}, drops_txt)
        assert out["txt"] is None
    assert len(calls) == 1 and run.skipped_calls == 2


# -- histories -------------------------------------------------------------------------------------------------
def test_a_block_missing_from_a_full_call_runs_until_its_history_is_long_enough():
    """The model leaves block 2 out of the second call (as skip-layer guidance does): at the third call the
    other blocks have the two residuals linear extrapolation needs and are predicted, block 2 has one and must
    run. The output is the uncached one."""
    sig = [1.0, 0.8, 0.6, 0.0]
    blocks = [LinearBlock(k) for k in range(4)]
    run = DiTCacheRun(sig, KEYS, BIG, order=2, max_skips=10)
    x, txt = torch.zeros(2, 5, 3), torch.zeros(2, 4, 3)
    forward(run, blocks, x, txt, sig[0], ["c", "u"])
    forward(run, blocks, x, txt, sig[1], ["c", "u"], skip_block=2)
    out = forward(run, blocks, x, txt, sig[2], ["c", "u"])
    assert run.skipped_calls == 1
    assert [b.calls for b in blocks] == [3, 2, 2, 2]
    want_img, want_txt = exact(x, txt, sig[2], ["c", "u"])
    torch.testing.assert_close(out["img"], want_img)
    torch.testing.assert_close(out["txt"], want_txt)


def test_a_call_without_sigmas_sits_at_the_start_of_the_run():
    """A call whose transformer options carry no sigmas is placed at position 0, where an infinitely noisy call
    would be. Residuals 1, 2 at positions 0 (no sigmas) and 1 extrapolate linearly to 3 at position 2, the value
    the blocks would compute there; the third call is predicted."""
    sig = [1.0, 0.75, 0.5, 0.0]
    level = {"v": 0.0}

    class Counting(LinearBlock):
        def __call__(self, args):
            self.calls += 1
            return {"img": args["img"] + (self.k + 1) * level["v"], "txt": args["txt"]}

    blocks = [Counting(k) for k in range(4)]
    run = DiTCacheRun(sig, KEYS, BIG, order=2, max_skips=10)
    x, txt = torch.zeros(2, 5, 3), torch.zeros(2, 4, 3)
    outs = []
    for i, s in enumerate([None, 0.75, 0.5]):
        level["v"] = i + 1.0
        to = {"uuids": ["c", "u"]} if s is None else {"sigmas": torch.tensor([s, s]), "uuids": ["c", "u"]}
        args = {"img": x.clone(), "txt": txt.clone(), "transformer_options": to}
        for k, b in enumerate(blocks):
            args = {**args, **run.block(KEYS[k], args, b)}
        outs.append(args["img"])
    assert [b.calls for b in blocks] == [3, 2, 2, 2] and run.skipped_calls == 1
    torch.testing.assert_close(outs[2], torch.full((2, 5, 3), 30.0))  # (1 + 2 + 3 + 4) * 3


def test_a_block_called_before_any_first_block_on_its_thread_is_computed():
    """A block on a thread whose model call was never set up by the first block made no skip decision: it runs
    every time, and its residual is kept as the whole batch, one unperturbed stream (the key ``chunk_keys``
    gives a call without uuids)."""
    run = DiTCacheRun([1.0, 0.5, 0.0], KEYS, BIG, order=1, max_skips=10)
    block = LinearBlock(1)
    x, txt = torch.zeros(2, 5, 3), torch.zeros(2, 4, 3)
    for _ in range(2):
        out = run.block(KEYS[1], {"img": x, "txt": txt, "transformer_options": {"sigmas": torch.tensor([0.5, 0.5])}},
                        block)
        torch.testing.assert_close(out["img"], x + LinearBlock.img_residual(1, 0.5, None, 2))
    assert block.calls == 2 and run.counts.run == {KEYS[1]: 2}
    assert {k for (_, _, k) in run.history} == set(chunk_keys({}, 2)) == {("__whole_batch__", False)}
