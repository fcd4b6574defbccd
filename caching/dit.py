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
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable

import torch

from .block_profile import relative_l1_change
from .clock import StepClock
from .extrapolation import History
from .store import ChunkKey, chunk_keys, split_chunks
from .unet_runner import BlockCounts

log = logging.getLogger("preprint.caching")

BlockKey = tuple[str, int]


class DiTCacheRun:
    """State of one sampling run of the DiT block cache."""

    name = "DiT block cache"

    def __init__(self, sample_sigmas, block_keys: list[BlockKey], threshold: float, order: int = 2,
                 max_skips: int = 3, sigma_start: float = float("inf"), sigma_end: float = 0.0):
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
        self.sigma_start, self.sigma_end = sigma_start, sigma_end
        self.history: dict[tuple[BlockKey, str, ChunkKey], History] = {}
        self.history_tag: dict[tuple[BlockKey, str, ChunkKey], Hashable] = {}
        self.none_streams: dict[BlockKey, set[str]] = {}
        self.reference: dict[ChunkKey, tuple[Hashable, torch.Tensor]] = {}
        self.consecutive: dict[ChunkKey, int] = {}
        self.counts = BlockCounts()
        self.calls = 0
        self.skipped_calls = 0
        self.inert = threshold == 0.0
        # the decision for the model call in progress, made at the first block
        self._skip = False
        self._keys: list[ChunkKey] = []
        self._pos = 0.0
        self._tag: Hashable = None

    # -- one block -------------------------------------------------------------------------------------------
    def block(self, key: BlockKey, args: dict, run_block: Callable[[dict], dict]) -> dict:
        if self.inert:
            return run_block(args)
        if key == self.first:
            return self._first_block(args, run_block)
        if self._skip and self._can_predict(key, args):
            self.counts.add(key, False)
            return self._predict(key, args)
        before = self._inputs(args)
        out = run_block(args)
        self.counts.add(key, True)
        self._record(key, before, out)
        return out

    def _first_block(self, args: dict, run_block: Callable[[dict], dict]) -> dict:
        self.calls += 1
        img = args["img"]
        to = args.get("transformer_options") or {}
        self._keys = chunk_keys(to, img.shape[0])
        sigma = StepClock.sigma_of(to["sigmas"]) if "sigmas" in to else float("inf")
        self._pos = self.clock.position(sigma) if "sigmas" in to else 0.0
        self._tag = (tuple(img.shape[1:]), img.shape[0] // len(self._keys), img.dtype, img.device,
                     tuple(t.shape[1:]) if torch.is_tensor(t := args.get("txt")) else None)
        # skip only once every block has the `order` computed residuals its extrapolation needs (they are all
        # computed together, so the first block's history length stands for all of them)
        ready = all(len(h) >= self.order and self.history_tag.get((self.first, "img", k)) == self._tag
                    for k in self._keys if (h := self.history.get((self.first, "img", k))) is not None) and all(
            (self.first, "img", k) in self.history for k in self._keys)
        before = self._inputs(args)
        out = run_block(args)
        self.counts.add(self.first, True)
        self._record(self.first, before, out)

        residual = out["img"] - before["img"]
        active = self.sigma_end <= sigma <= self.sigma_start
        skip = active and ready
        for k, r in zip(self._keys, split_chunks(residual, len(self._keys)), strict=True):
            ref = self.reference.get(k)
            if ref is None or ref[0] != self._tag:
                skip = False
                continue
            if self.consecutive.get(k, 0) >= self.max_skips:
                skip = False
            elif relative_l1_change(r, ref[1]) >= self.threshold:
                skip = False
        self._skip = skip
        if skip:
            self.skipped_calls += 1
            for k in self._keys:
                self.consecutive[k] = self.consecutive.get(k, 0) + 1
        else:
            for k, r in zip(self._keys, split_chunks(residual, len(self._keys)), strict=True):
                self.reference[k] = (self._tag, r.detach().clone())
                self.consecutive[k] = 0
        return out

    # -- residual histories ----------------------------------------------------------------------------------
    @staticmethod
    def _inputs(args: dict) -> dict[str, torch.Tensor]:
        """Copies of the block's input streams, taken before it runs.

        Many ComfyUI blocks add to their input in place and return that same tensor (Flux's single blocks and
        text stream, Chroma, LTXV, HunyuanVideo): after the call the input reads as the output, and a residual
        taken against it would be zero, so a skipped block would act as the identity.
        """
        return {s: args[s].detach().clone() for s in ("img", "txt") if torch.is_tensor(args.get(s))}

    @staticmethod
    def _streams(args: dict, out: dict) -> list[str]:
        return [s for s in ("img", "txt") if torch.is_tensor(args.get(s)) and torch.is_tensor(out.get(s))
                and args[s].shape == out[s].shape]

    def _record(self, key: BlockKey, before: dict[str, torch.Tensor], out: dict) -> None:
        """Push each stream's residual, ``out`` minus the input copy ``before`` (see :meth:`_inputs`)."""
        for s in ("img", "txt"):
            if s in before and out.get(s) is None and s in out:
                self.none_streams.setdefault(key, set()).add(s)  # e.g. SD3's last block drops the context
        for s in self._streams(before, out):
            res = out[s] - before[s]
            for k, r in zip(self._keys, split_chunks(res, len(self._keys)), strict=True):
                h = self.history.get((key, s, k))
                if h is None or self.history_tag.get((key, s, k)) != self._tag:
                    h = History(self.order)
                    self.history[(key, s, k)] = h
                    self.history_tag[(key, s, k)] = self._tag
                h.push(self._pos, r)

    def _can_predict(self, key: BlockKey, args: dict) -> bool:
        for s in ("img", "txt"):
            if not torch.is_tensor(args.get(s)) or s in self.none_streams.get(key, ()):
                continue
            for k in self._keys:
                h = self.history.get((key, s, k))
                if h is None or len(h) < self.order or self.history_tag.get((key, s, k)) != self._tag:
                    return False  # no history for this stream yet: the block must run
        return True

    def _predict(self, key: BlockKey, args: dict) -> dict:
        out: dict = {}
        for s in ("img", "txt"):
            a = args.get(s)
            if not torch.is_tensor(a):
                continue
            if s in self.none_streams.get(key, ()):
                out[s] = None
                continue
            pred = [self.history[(key, s, k)].predict(self._pos) for k in self._keys]
            out[s] = a + (pred[0] if len(pred) == 1 else torch.cat(pred, dim=0))
        return out

    def summary(self) -> str:
        return (f"{self.name}: {self.skipped_calls}/{self.calls} model calls skipped the blocks after the first; "
                f"{100 * self.counts.skipped_fraction():.0f}% of block evaluations skipped")
