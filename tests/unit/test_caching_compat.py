"""The cached forwards against newer ComfyUI's hooks: the UNet middle-block hook, output-block patches that
merge the skip feature themselves, unknown patches, LTX-2's (video, audio) block streams, and cond chunks run
on several threads at once (pure torch)."""

from __future__ import annotations

import threading

import torch

from preprint.caching.dit import DiTCacheRun
from preprint.caching.unet_policies import EncoderPropagationRun
from preprint.caching.unet_runner import RunAll, run_unet, unhandled_patches

from .test_caching_unet import TinyUNet, timestep_embedding


def _reference(unet, x, t, middle_after=None, merge_skip=None):
    """The newest stock UNet forward, written plainly: ``middle_after`` runs on the middle block's output,
    ``merge_skip(h, hsp)`` replaces the concatenation of the skip feature."""
    emb = unet.time_embed(timestep_embedding(t, 8))
    hs, h = [], x
    for m in unet.input_blocks:
        h = m(h, emb)
        hs.append(h)
    h = unet.middle_block(h, emb)
    if middle_after is not None:
        h = middle_after(h)
    for m in unet.output_blocks:
        hsp = hs.pop()
        h = merge_skip(h, hsp) if merge_skip is not None else torch.cat([h, hsp], 1)
        h = m(h, emb, output_shape=hs[-1].shape if hs else None)
    return unet.out(h)


def _run(unet, plan, x, t, to):
    with torch.no_grad():
        return run_unet(unet, plan, timestep_embedding, x, t, None, None, None, to)


def _middle_patch(seen: list):
    def patch(args: dict) -> dict:
        seen.append(sorted(args))
        return {"h": args["h"] * 1.5 + 0.25}
    return patch


def test_middle_block_after_patch_runs_as_the_newest_forward_runs_it():
    unet = TinyUNet().eval()
    x, t = torch.randn(2, 2, 8, 8), torch.tensor([300.0, 300.0])
    seen: list = []
    out = _run(unet, RunAll(), x, t, {"patches": {"middle_block_after_patch": [_middle_patch(seen)]}})
    with torch.no_grad():
        ref = _reference(unet, x, t, middle_after=lambda h: h * 1.5 + 0.25)
        assert torch.equal(out, ref)
        assert not torch.equal(out, _reference(unet, x, t))
    assert seen == [["context", "emb", "h", "timesteps", "transformer_options", "x", "y"]]


def test_middle_block_after_patch_applies_to_a_reused_middle_feature():
    unet = TinyUNet().eval()
    x, t = torch.randn(2, 2, 8, 8), torch.tensor([300.0, 300.0])
    run = EncoderPropagationRun(unet, [10.0, 5.0, 0.0], interval=2)
    seen: list = []

    def to(sigma):
        return {"sigmas": torch.tensor([sigma, sigma]), "uuids": ["c", "u"],
                "patches": {"middle_block_after_patch": [_middle_patch(seen)]}}

    _run(unet, run.plan(x, to(10.0)), x, t, to(10.0))  # key step: records the encoder features
    plan = run.plan(x, to(5.0))
    out = _run(unet, plan, x, t, to(5.0))  # the middle block is reused, its hook still runs
    assert run.reuse_calls == 1 and len(seen) == 2
    with torch.no_grad():
        assert torch.equal(out, _reference(unet, x, t, middle_after=lambda h: h * 1.5 + 0.25))


def test_output_block_patch_may_merge_the_skip_feature_and_return_none():
    unet = TinyUNet().eval()
    x, t = torch.randn(2, 2, 8, 8), torch.tensor([300.0, 300.0])

    def merge(h, hsp, transformer_options):
        return torch.cat([h, 0.5 * hsp], 1), None

    out = _run(unet, RunAll(), x, t, {"patches": {"output_block_patch": [merge]}})
    with torch.no_grad():
        assert torch.equal(out, _reference(unet, x, t, merge_skip=lambda h, hsp: torch.cat([h, 0.5 * hsp], 1)))


def test_unhandled_patches_lists_only_what_the_cached_forward_cannot_run():
    def f(*a):
        return a

    known = {"patches": {k: [f] for k in ("emb_patch", "input_block_patch", "input_block_patch_after_skip",
                                          "middle_block_after_patch", "output_block_patch", "attn1_patch",
                                          "attn2_output_patch", "middle_patch", "forward_timestep_embed_patch")},
             "patches_replace": {"attn1": {("input", 1): f}, "attn2": {}, "dit": {("double_block", 0): f}}}
    assert unhandled_patches(known) == []
    assert unhandled_patches(None) == []
    to = {"patches": {**known["patches"], "future_patch": [f], "empty_future_patch": []},
          "patches_replace": {"future_replace": {("middle", 0): f}}}
    assert unhandled_patches(to) == ["patches['future_patch']", "patches_replace['future_replace']"]


# -- LTX-2 audio-video blocks: img is a (video, audio) tuple ----------------------------------------------------
class _AVBlock:
    """An LTX-2-style block: adds to both streams of its (video, audio) input in place and returns them; each
    stream's residual is a linear function of sigma, with its own slope."""

    def __init__(self, k: int):
        self.k, self.calls = k, 0

    def __call__(self, args: dict) -> dict:
        self.calls += 1
        vx, ax = args["img"]
        s = args["transformer_options"]["sigmas"][0].item()
        rows = torch.arange(1, vx.shape[0] + 1, dtype=torch.float32).reshape(-1, 1, 1)
        vx.add_(rows * (self.k + 1) * (1.0 + 0.5 * s))
        ax.add_(rows * (self.k + 2) * (2.0 - 0.7 * s))
        return {"img": (vx, ax)}


def _av_forward(run, blocks, x, sigma, uuids):
    to = {"sigmas": torch.tensor([sigma] * x[0].shape[0]), "uuids": list(uuids)}
    args = {"img": tuple(t.clone() for t in x), "transformer_options": to}
    for i, b in enumerate(blocks):
        out = run.block(("double_block", i), args, b)
        args = {**args, **out}
    return args["img"]


def _av_run(threshold, order, sigmas, audio_tokens=3):
    blocks = [_AVBlock(k) for k in range(4)]
    run = DiTCacheRun(sigmas, [("double_block", i) for i in range(4)], threshold, order, max_skips=10)
    x = (torch.zeros(2, 5, 3), torch.zeros(2, audio_tokens, 2))
    return [_av_forward(run, blocks, x, s, ("c", "u")) for s in sigmas[:-1]], blocks, run


def test_dit_cache_extrapolates_video_and_audio_streams_separately():
    sig = [1.0, 0.8, 0.6, 0.4, 0.2, 0.0]
    exact, _, _ = _av_run(0.0, 1, sig)
    ab2, blocks, run = _av_run(10.0, 2, sig)  # threshold high: skip whenever allowed
    assert run.skipped_calls > 0 and blocks[1].calls < 5
    for e, a in zip(exact, ab2, strict=True):
        assert isinstance(a, tuple) and len(a) == 2
        torch.testing.assert_close(a[0], e[0])
        torch.testing.assert_close(a[1], e[1])  # the audio stream has its own residuals, not the video's


def test_dit_cache_handles_an_empty_audio_stream():
    sig = [1.0, 0.8, 0.6, 0.4, 0.2, 0.0]
    exact, _, _ = _av_run(0.0, 1, sig, audio_tokens=0)
    ab2, _, run = _av_run(10.0, 2, sig, audio_tokens=0)
    assert run.skipped_calls > 0
    for e, a in zip(exact, ab2, strict=True):
        torch.testing.assert_close(a[0], e[0])
        assert a[1].numel() == 0


# -- cond chunks on several threads (newer ComfyUI's multi-device cond batching) --------------------------------
class _StreamBlock:
    """A block whose residual differs between the cond ("c") and uncond ("u") chunk, so a call that took the
    other chunk's state would show."""

    def __init__(self, k: int):
        self.k = k

    def __call__(self, args: dict) -> dict:
        to = args["transformer_options"]
        s, scale = to["sigmas"][0].item(), 1.0 if to["uuids"] == ["c"] else -3.0
        return {"img": args["img"] + scale * (self.k + 1) * (1.0 + 0.5 * s), "txt": args["txt"]}


def test_dit_cache_calls_running_on_two_threads_keep_their_own_state():
    sig = [1.0, 0.8, 0.6, 0.4, 0.2, 0.0]

    def forward(run, blocks, x, s, uuid, barrier=None):
        to = {"sigmas": torch.tensor([s]), "uuids": [uuid]}
        args = {"img": x.clone(), "txt": torch.zeros(1, 2, 3), "transformer_options": to}
        for i, b in enumerate(blocks):
            args = {**args, **run.block(("double_block", i), args, b)}
            if barrier is not None and i == 0:
                barrier.wait(timeout=10)  # both threads have run their first block before either goes on
        return args["img"]

    def new_run():
        return DiTCacheRun(sig, [("double_block", i) for i in range(4)], 10.0, 2, max_skips=10)

    x = {"c": torch.zeros(1, 5, 3), "u": torch.ones(1, 5, 3)}
    blocks = [_StreamBlock(k) for k in range(4)]
    seq_run = new_run()
    sequential = {u: [] for u in x}
    for s in sig[:-1]:
        for u in x:
            sequential[u].append(forward(seq_run, blocks, x[u], s, u))
    par_run = new_run()
    parallel = {u: [] for u in x}
    for s in sig[:-1]:
        barrier = threading.Barrier(2)
        threads = [threading.Thread(target=lambda u=u, s=s, b=barrier: parallel[u].append(
            forward(par_run, blocks, x[u], s, u, b))) for u in x]
        for th in threads:
            th.start()
        for th in threads:
            th.join(timeout=20)
    assert par_run.skipped_calls == seq_run.skipped_calls > 0
    for u in x:
        for a, b in zip(parallel[u], sequential[u], strict=True):
            torch.testing.assert_close(a, b)
