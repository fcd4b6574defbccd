"""Per-run block-reuse policies for UNets (SD1.x / SD2.x / SDXL): DeepCache, encoder propagation, Block Caching.

Each policy is a *run* object, created fresh when sampling starts and dropped when it ends, so a second run
with other steps, resolution, batch size or dtype starts clean. For every model call it returns a plan for
:func:`caching.unet_runner.run_unet` (or None: run the stock forward untouched). Cached features live in a
:class:`caching.store.ChunkStore`, one entry per conditioning stream.

- DeepCache (Ma et al., arXiv:2312.00858, Sec. 3.2): the skip branch at depth b (input blocks 0..b and the
  mirrored output blocks) is recomputed every step; the main branch's high-level feature, i.e. the output of
  the output block just before the shallow ones, is recomputed only on refresh steps and reused in between.
- Encoder propagation (Li et al., "Faster Diffusion", arXiv:2312.09608, Sec. 3.3): on non-key steps the
  encoder (input blocks and middle block) is not run; its features from the last key step feed the decoder.
  For both, the features kept from a refresh (key) step are those of the first call at its noise level; a later
  call there on another input computes in full without replacing them (see
  :class:`caching.store.ReferenceInputs`).
- Block Caching (Wimbauer et al., arXiv:2312.03209, Sec. 3.2): each block is reused while the change
  predicted since it was last computed stays under a threshold, from a calibrated profile or online from
  the block's own last measured rate of change. A block computed at the call's own noise level has no
  predicted change at all; it is reused only for the input it was computed from (see
  :class:`caching.store.ReferenceInputs`).
"""

from __future__ import annotations

import logging
import threading

import torch

from ..utils.sigma_window import SigmaWindow
from .block_profile import Calibrator, Profile, block_key, relative_l1_change
from .clock import StepClock
from .schedules import faster_diffusion_keys, refresh_steps
from .store import OTHER, SAME, ChunkKey, ChunkStore, ReferenceInputs, chunk_keys, split_chunks
from .unet_runner import REUSE, RUN, SKIP, BlockCounts, BlockName, block_names

log = logging.getLogger("preprint.caching")


def _tag(x: torch.Tensor, n_chunks: int) -> tuple:
    # what a cached entry was made for: per-chunk input shape, dtype, device
    return (x.shape[0] // n_chunks, *x.shape[1:]), x.dtype, x.device


class _Plan:
    """A fixed per-call plan: actions by block name (default RUN), outputs to record for the chunks in
    ``record_keys`` (all of them unless given)."""

    def __init__(self, run: UNetCacheRun, keys: list[ChunkKey], tag: tuple, actions: dict[BlockName, str],
                 record: set[BlockName], record_keys: set[ChunkKey] | None = None):
        self.run, self.keys, self.tag, self.actions, self.record = run, keys, tag, actions, record
        self.record_keys = set(keys) if record_keys is None else record_keys

    def action(self, name: BlockName) -> str:
        return self.actions.get(name, RUN)

    def cached(self, name: BlockName) -> torch.Tensor:
        return self.run.store.get(name, self.keys)

    def computed(self, name: BlockName, out: torch.Tensor) -> None:
        if name not in self.record or not self.record_keys:
            return
        if len(self.record_keys) == len(self.keys):
            self.run.store.put(name, self.keys, out, self.tag)
            return
        for k, part in zip(self.keys, split_chunks(out, len(self.keys)), strict=True):
            if k in self.record_keys:
                self.run.store.put(name, [k], part, self.tag)


class UNetCacheRun:
    """State of one sampling run for one UNet policy."""

    name = "cache"

    def __init__(self, unet: torch.nn.Module, sample_sigmas, window: SigmaWindow = SigmaWindow()):
        self.clock = StepClock(sample_sigmas)
        self.window = window
        self.names = block_names(unet)
        self.n_in = len(unet.input_blocks)
        self.n_out = len(unet.output_blocks)
        self.store = ChunkStore()
        self.counts = BlockCounts()
        self.calls = 0
        self.reuse_calls = 0
        self.fallback_calls = 0
        self._warned: set[tuple[str, ...]] = set()
        # Newer ComfyUI may run the cond chunks of one step on several devices at once, one thread each, all
        # against this run. Chunks carry their own uuids, so their entries never collide, but the dicts they
        # live in and the counters are shared: every read and write of run state goes through this lock; the
        # blocks themselves compute outside it.
        self.lock = threading.RLock()

    def plan(self, x: torch.Tensor, transformer_options: dict):
        raise NotImplementedError

    def plan_for(self, x: torch.Tensor, transformer_options: dict):
        """:meth:`plan` for a model call that may run concurrently with others of this run."""
        with self.lock:
            plan = self.plan(x, transformer_options)
        return None if plan is None else LockedPlan(plan, self)

    def fallback(self, unhandled: list[str]) -> None:
        """Note a call handed to the stock forward because it carries patches the cached forward cannot run;
        warn once per set of such patches and run."""
        with self.lock:
            self.fallback_calls += 1
            key = tuple(unhandled)
            if key in self._warned:
                return
            self._warned.add(key)
        log.warning("%s: the model carries %s, which Preprint's cached UNet forward does not know how to run; "
                    "these calls use ComfyUI's own forward, uncached, so that the patch still applies.",
                    self.name, ", ".join(unhandled))

    def _call(self, x: torch.Tensor, transformer_options: dict) -> tuple[float, list[ChunkKey], tuple]:
        self.calls += 1
        keys = chunk_keys(transformer_options, x.shape[0])
        sigma = StepClock.sigma_of(transformer_options["sigmas"])
        return sigma, keys, _tag(x, len(keys))

    def summary(self) -> str:
        text = (f"{self.name}: {self.reuse_calls}/{self.calls} model calls reused cached features; "
                f"{100 * self.counts.skipped_fraction():.0f}% of block evaluations skipped")
        if self.fallback_calls:
            text += f"; {self.fallback_calls} calls ran uncached (patches the cached forward does not run)"
        return text

    def finish(self) -> None:
        self.store.clear()


class LockedPlan:
    """A plan whose reads and writes of run state hold the run's lock (see :attr:`UNetCacheRun.lock`)."""

    def __init__(self, plan, run: UNetCacheRun):
        self.plan, self.run = plan, run

    def action(self, name: BlockName) -> str:
        with self.run.lock:
            return self.plan.action(name)

    def cached(self, name: BlockName) -> torch.Tensor:
        with self.run.lock:
            return self.plan.cached(name)

    def computed(self, name: BlockName, out: torch.Tensor) -> None:
        with self.run.lock:
            self.plan.computed(name, out)

    def after_call(self) -> None:
        after = getattr(self.run, "after_call", None)
        if after is not None:
            with self.run.lock:
                after(self.plan)


class _KeyStepRun(UNetCacheRun):
    """Caches that refresh on a fixed set of key steps and reuse ``cached_blocks`` on the others."""

    refresh: set[int]
    cached_blocks: list[BlockName]
    reuse_actions: dict[BlockName, str]

    def __init__(self, unet, sample_sigmas, window: SigmaWindow = SigmaWindow()):
        super().__init__(unet, sample_sigmas, window)
        self.references = ReferenceInputs()

    def plan(self, x, transformer_options):
        if self.inert:
            self.calls += 1
            return None
        sigma, keys, tag = self._call(x, transformer_options)
        kinds = self.references.classify(keys, x, self.clock.position(sigma))
        reuse = (sigma in self.window and self.clock.step(sigma) not in self.refresh
                 and all(self.store.has(n, keys, tag) for n in self.cached_blocks))
        if reuse:
            # every call between refreshes reads features made from another input: a later call at this noise
            # level with its own input is no different from the first
            self.reuse_calls += 1
            return _Plan(self, keys, tag, self.reuse_actions, set())
        # features recorded here feed the following steps; they must be the reference call's (the first at this
        # noise level), not those of a later call on another input (a guidance pass on a degraded input, a
        # refinement call, Heun's step after its corrector), which computes in full and leaves them alone
        record = {k for k in keys if kinds[k] != OTHER}
        return _Plan(self, keys, tag, {}, set(self.cached_blocks), record)

    def finish(self) -> None:
        super().finish()
        self.references.clear()


class DeepCacheRun(_KeyStepRun):
    name = "DeepCache"

    def __init__(self, unet, sample_sigmas, interval: int, branch: int, schedule: str = "uniform",
                 window: SigmaWindow = SigmaWindow(), center: float = 0.3, power: float = 1.4):
        super().__init__(unet, sample_sigmas, window)
        if self.n_in != self.n_out:
            raise ValueError(f"DeepCache needs mirrored input/output blocks; this UNet has {self.n_in} input and "
                             f"{self.n_out} output blocks.")
        if not 0 <= branch <= self.n_out - 2:
            raise ValueError(f"DeepCache branch depth {branch} is out of range for this UNet: choose 0 to "
                             f"{self.n_out - 2} (it has {self.n_in} input blocks).")
        self.branch = branch
        self.refresh = refresh_steps(schedule, self.clock.steps, interval, center, power)
        self.cache_name: BlockName = ("output", self.n_out - 2 - branch)
        # the deep branch below the cached feature: not run between refreshes
        deep = ([("input", i) for i in range(branch + 1, self.n_in)] + [("middle", 0)]
                + [("output", j) for j in range(self.n_out - 2 - branch)])
        self.reuse_actions = {**dict.fromkeys(deep, SKIP), self.cache_name: REUSE}
        self.cached_blocks = [self.cache_name]
        # nothing is ever reused: leave the model alone (bitwise identical, no overhead)
        self.inert = len(self.refresh) >= self.clock.steps


class EncoderPropagationRun(_KeyStepRun):
    name = "Encoder propagation"

    def __init__(self, unet, sample_sigmas, interval: int | None = None, window: SigmaWindow = SigmaWindow()):
        super().__init__(unet, sample_sigmas, window)
        self.refresh = faster_diffusion_keys(self.clock.steps, interval)
        # input block 0 is the stem convolution on the noisy latent: it is nearly free and carries the current
        # x to the last decoder block, so it always runs.
        self.cached_blocks = [("input", i) for i in range(1, self.n_in)] + [("middle", 0)]
        self.reuse_actions = dict.fromkeys(self.cached_blocks, REUSE)
        self.inert = len(self.refresh) >= self.clock.steps


class _BlockCachePlan:
    def __init__(self, run: BlockCacheRun, keys, tag, p: float, active: bool, kinds: dict[ChunkKey, str]):
        self.run, self.keys, self.tag, self.p, self.active, self.kinds = run, keys, tag, p, active, kinds
        self.reused_any = False

    def action(self, name: BlockName) -> str:
        r = self.run
        if r.mode == "calibrate" or not self.active or name not in r.eligible:
            return RUN
        if not r.store.has(name, self.keys, self.tag):
            return RUN
        if not all(self._reusable(name, k) for k in self.keys):
            return RUN
        self.reused_any = True
        return REUSE

    def _reusable(self, name: BlockName, key: ChunkKey) -> bool:
        last = self.run.last_p.get((name, key))
        if last is None or last > self.p:
            return False  # nothing stored, or stored further down the run (a restart went back up)
        if last == self.p:
            # no progress, so no predicted change: the stored output is exact for the input it was computed
            # from (the reference call at this noise level) and says nothing about any other input
            return self.kinds[key] == SAME
        return self.run.predicted_change(name, key, last, self.p) < self.run.threshold

    def cached(self, name: BlockName) -> torch.Tensor:
        return self.run.store.get(name, self.keys)

    def computed(self, name: BlockName, out: torch.Tensor) -> None:
        r = self.run
        if name not in r.eligible:
            return
        parts = out.chunk(len(self.keys), dim=0) if len(self.keys) > 1 else [out]
        have_old = r.store.has(name, self.keys, self.tag)
        for k, part in zip(self.keys, parts, strict=True):
            if self.kinds[k] == OTHER:
                # another input at the reference's noise level (Heun's step after its corrector, a degraded
                # guidance pass): its features must neither replace the reference's nor enter its rates
                continue
            last = r.last_p.get((name, k))
            old = r.store.get_chunk(name, k) if have_old else None
            if old is not None and last is not None and self.p > last:
                change = relative_l1_change(part, old)
                r.rates[(name, k)] = change / (self.p - last)
                if r.calibrator is not None:
                    r.calibrator.add(block_key(name), last, self.p, change)
            r.store.put(name, [k], part, self.tag)
            r.last_p[(name, k)] = self.p


class BlockCacheRun(UNetCacheRun):
    """Block Caching. ``mode``: "online" (rates measured as sampling goes), "profile" (rates from a calibrated
    profile) or "calibrate" (run everything, measure, build a profile at the end)."""

    name = "Block Caching"

    def __init__(self, unet, sample_sigmas, mode: str, threshold: float, profile: Profile | None = None,
                 window: SigmaWindow = SigmaWindow()):
        super().__init__(unet, sample_sigmas, window)
        if mode not in ("online", "profile", "calibrate"):
            raise ValueError(f"unknown block-cache mode {mode!r}")
        if mode == "profile" and profile is None:
            raise ValueError("block-cache mode 'profile' needs a profile")
        if threshold < 0:
            raise ValueError(f"threshold must be >= 0, got {threshold}")
        self.mode, self.threshold, self.profile = mode, threshold, profile
        # the stem convolution reads x itself: reusing it would freeze the input
        self.eligible = set(self.names) - {("input", 0)}
        self.last_p: dict[tuple[BlockName, ChunkKey], float] = {}
        self.rates: dict[tuple[BlockName, ChunkKey], float] = {}
        self.calibrator = Calibrator() if mode == "calibrate" else None
        self.references = ReferenceInputs()
        self.inert = mode != "calibrate" and threshold == 0.0

    def predicted_change(self, name: BlockName, key: ChunkKey, p0: float, p1: float) -> float:
        if self.mode == "profile":
            return self.profile.accumulated(block_key(name), p0, p1)
        rate = self.rates.get((name, key))
        return float("inf") if rate is None else rate * (p1 - p0)

    def plan(self, x, transformer_options):
        if self.inert:
            self.calls += 1
            return None
        sigma, keys, tag = self._call(x, transformer_options)
        p = self.clock.progress(sigma)
        return _BlockCachePlan(self, keys, tag, p, sigma in self.window, self.references.classify(keys, x, p))

    def after_call(self, plan) -> None:
        if isinstance(plan, _BlockCachePlan) and plan.reused_any:
            self.reuse_calls += 1

    def finish(self) -> None:
        super().finish()
        self.references.clear()
