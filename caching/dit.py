"""Block caching for diffusion transformers (Flux, SD3, Chroma, HunyuanVideo, Wan, Qwen-Image...).

Every transformer block is wrapped (ComfyUI's ``patches_replace["dit"]``). The first block always runs; the
relative L1 change of its residual (output minus input) against the residual it had at the last fully
computed call decides whether the rest of the stack may be skipped for this call, the criterion of
First-Block Cache / TeaCache (Liu et al., "Timestep Embedding Tells: It's Time to Cache for Video Diffusion
Model", arXiv:2411.19108, Sec. 3.3, which accumulates a per-step indicator; here the first block's own output
is the indicator, measured against the last refresh). A skipped block returns its input plus a *predicted*
residual: Adams-Bashforth extrapolation over the residuals of its last computed calls (AB-Cache,
arXiv:2504.10540; see :mod:`caching.extrapolation`) instead of a copy of the last one.

State is per run and per conditioning stream (chunk uuid, perturbed or not): cond and uncond never share a
residual, and each keeps its own refresh reference.

A block's ``img`` (or ``txt``) may be a tuple of tensors: LTX-2's audio-video transformer passes ``(video,
audio)`` through one block. Each element is a stream of its own, with its own residuals; the first block's
criterion must hold for every element.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field

import torch

from ..utils.sigma_window import SigmaWindow
from .block_profile import relative_l1_change
from .clock import StepClock
from .extrapolation import History
from .store import ChunkKey, chunk_keys, split_chunks
from .unet_runner import BlockCounts

log = logging.getLogger("preprint.caching")

BlockKey = tuple[str, int]


STREAMS = ("img", "txt")


def flat_streams(d: dict) -> dict[str, torch.Tensor]:
    """The tensors of a block's ``img`` / ``txt`` entries by stream name: ``"img"`` for a tensor, ``"img.0"``,
    ``"img.1"``... for the elements of a tuple."""
    out: dict[str, torch.Tensor] = {}
    for s in STREAMS:
        v = d.get(s)
        if torch.is_tensor(v):
            out[s] = v
        elif isinstance(v, (tuple, list)) and v and all(torch.is_tensor(t) for t in v):
            out.update((f"{s}.{i}", t) for i, t in enumerate(v))
    return out


@dataclass
class _Call:
    """The model call in progress on one thread, set up by its first block."""

    skip: bool = False
    keys: list[ChunkKey] = field(default_factory=lambda: [("__whole_batch__", False)])
    pos: float = 0.0
    tag: Hashable = None


class DiTCacheRun:
    """State of one sampling run of the DiT block cache."""

    name = "DiT block cache"

    def __init__(self, sample_sigmas, block_keys: list[BlockKey], threshold: float, order: int = 2,
                 max_skips: int = 3, window: SigmaWindow = SigmaWindow()):
        if not block_keys:
            raise ValueError("the model has no transformer blocks to cache")
        if threshold < 0:
            raise ValueError(f"threshold must be >= 0, got {threshold}")
        if order not in (1, 2, 3):
            raise ValueError(f"extrapolation order must be 1, 2 or 3, got {order}")
        self.clock = StepClock(sample_sigmas)
        self.block_keys = list(block_keys)
        self.first = self.block_keys[0]
        self.threshold, self.order, self.max_skips = threshold, order, max_skips
        self.window = window
        self.history: dict[tuple[BlockKey, str, ChunkKey], History] = {}
        self.history_tag: dict[tuple[BlockKey, str, ChunkKey], Hashable] = {}
        self.none_streams: dict[BlockKey, set[str]] = {}
        # streams each block hands back: Wan's blocks take the text ("txt") but return only "img", so a skipped
        # block must predict (and wait for history of) the returned streams alone
        self.out_streams: dict[BlockKey, set[str]] = {}
        self.reference: dict[tuple[ChunkKey, str], tuple[Hashable, torch.Tensor]] = {}
        self.consecutive: dict[ChunkKey, int] = {}
        self.counts = BlockCounts()
        self.calls = 0
        self.skipped_calls = 0
        self.inert = threshold == 0.0
        # Newer ComfyUI may run the cond chunks of one step on several devices at once, one thread each: the
        # call in progress is per thread, and the shared dicts are read and written under the lock (the blocks
        # compute outside it).
        self._local = threading.local()
        self.lock = threading.RLock()

    def _call(self) -> _Call:
        call = getattr(self._local, "call", None)
        if call is None:
            call = self._local.call = _Call()
        return call

    # -- one block -------------------------------------------------------------------------------------------
    def block(self, key: BlockKey, args: dict, run_block: Callable[[dict], dict]) -> dict:
        if self.inert:
            return run_block(args)
        if key == self.first:
            return self._first_block(args, run_block)
        call = self._call()
        with self.lock:
            predict = call.skip and self._can_predict(call, key, args)
            if predict:
                self.counts.add(key, False)
                return self._predict(call, key, args)
        before = self._inputs(args)
        out = run_block(args)
        self.counts.add(key, True)
        with self.lock:
            self._record(call, key, before, out)
        return out

    def _first_block(self, args: dict, run_block: Callable[[dict], dict]) -> dict:
        call = self._local.call = _Call()
        img = flat_streams({"img": args["img"]})
        if not img:
            raise TypeError(f"{self.name}: the first block's 'img' is a {type(args['img']).__name__}, neither a "
                            "tensor nor a tuple of tensors")
        lead = next(iter(img.values()))
        to = args.get("transformer_options") or {}
        call.keys = chunk_keys(to, lead.shape[0])
        sigma = StepClock.sigma_of(to["sigmas"]) if "sigmas" in to else float("inf")
        call.pos = self.clock.position(sigma) if "sigmas" in to else 0.0
        call.tag = (tuple((n, tuple(t.shape[1:]), t.dtype, t.device) for n, t in img.items()),
                    lead.shape[0] // len(call.keys),
                    tuple(t.shape[1:]) if torch.is_tensor(t := args.get("txt")) else None)
        with self.lock:
            self.calls += 1
            # skip only once every block has the `order` computed residuals its extrapolation needs (they are
            # all computed together, so the first block's history stands for all of them)
            ready = all(
                (h := self.history.get((self.first, n, k))) is not None and len(h) >= self.order
                and self.history_tag.get((self.first, n, k)) == call.tag for n in img for k in call.keys)
        before = self._inputs(args)
        out = run_block(args)
        self.counts.add(self.first, True)
        after = flat_streams(out)
        residuals = {n: split_chunks(after[n] - before[n], len(call.keys)) for n in img
                     if n in after and after[n].shape == before[n].shape}
        active = sigma in self.window
        with self.lock:
            self._record(call, self.first, before, out)
            skip = active and ready and len(residuals) == len(img)
            for n, parts in residuals.items():
                for k, r in zip(call.keys, parts, strict=True):
                    ref = self.reference.get((k, n))
                    if ref is None or ref[0] != call.tag or self.consecutive.get(k, 0) >= self.max_skips:
                        skip = False
                    elif relative_l1_change(r, ref[1]) >= self.threshold:
                        skip = False
            call.skip = skip
            if skip:
                self.skipped_calls += 1
                for k in call.keys:
                    self.consecutive[k] = self.consecutive.get(k, 0) + 1
            else:
                for n, parts in residuals.items():
                    for k, r in zip(call.keys, parts, strict=True):
                        self.reference[(k, n)] = (call.tag, r.detach().clone())
                for k in call.keys:
                    self.consecutive[k] = 0
        return out

    # -- residual histories ----------------------------------------------------------------------------------
    @staticmethod
    def _inputs(args: dict) -> dict[str, torch.Tensor]:
        """Copies of the block's input streams, taken before it runs.

        Many ComfyUI blocks add to their input in place and return that same tensor (Flux's single blocks and
        text stream, Chroma, LTXV and LTX-2's audio-video blocks, HunyuanVideo): after the call the input reads
        as the output, and a residual taken against it would be zero, so a skipped block would act as the
        identity.
        """
        return {n: t.detach().clone() for n, t in flat_streams(args).items()}

    def _record(self, call: _Call, key: BlockKey, before: dict[str, torch.Tensor], out: dict) -> None:
        """Push each stream's residual, ``out`` minus the input copy ``before`` (see :meth:`_inputs`)."""
        self.out_streams[key] = {s for s in STREAMS if s in out}
        for s in STREAMS:
            if s in out and out[s] is None and any(n == s or n.startswith(s + ".") for n in before):
                self.none_streams.setdefault(key, set()).add(s)  # e.g. SD3's last block drops the context
        after = flat_streams(out)
        for n, b in before.items():
            if n not in after or after[n].shape != b.shape:
                continue
            for k, r in zip(call.keys, split_chunks(after[n] - b, len(call.keys)), strict=True):
                h = self.history.get((key, n, k))
                if h is None or self.history_tag.get((key, n, k)) != call.tag:
                    h = History(self.order)
                    self.history[(key, n, k)] = h
                    self.history_tag[(key, n, k)] = call.tag
                h.push(call.pos, r)

    def _can_predict(self, call: _Call, key: BlockKey, args: dict) -> bool:
        dropped = self.none_streams.get(key, ())
        returned = self.out_streams.get(key)
        if returned is None:
            return False  # the block never ran in this run
        for n in flat_streams({s: args.get(s) for s in STREAMS if s not in dropped and s in returned}):
            for k in call.keys:
                h = self.history.get((key, n, k))
                if h is None or len(h) < self.order or self.history_tag.get((key, n, k)) != call.tag:
                    return False  # no history for this stream yet: the block must run
        return True

    def _predict(self, call: _Call, key: BlockKey, args: dict) -> dict:
        out: dict = {}
        for s in STREAMS:
            a = args.get(s)
            parts = flat_streams({s: a})
            if not parts or s not in self.out_streams[key]:
                continue
            if s in self.none_streams.get(key, ()):
                out[s] = None
                continue
            new = {}
            for n, t in parts.items():
                pred = [self.history[(key, n, k)].predict(call.pos) for k in call.keys]
                new[n] = t + (pred[0] if len(pred) == 1 else torch.cat(pred, dim=0))
            out[s] = new[s] if torch.is_tensor(a) else tuple(new[f"{s}.{i}"] for i in range(len(a)))
        return out

    def summary(self) -> str:
        return (f"{self.name}: {self.skipped_calls}/{self.calls} model calls skipped the blocks after the first; "
                f"{100 * self.counts.skipped_fraction():.0f}% of block evaluations skipped")
