"""What the block-caching nodes share: display names, the node base with its widget checks, model checks, and
the wrappers that put a cache run into ComfyUI's sampling.

Per-run state is created in an OUTER_SAMPLE wrapper and put into that run's (cloned) ``transformer_options``, so
nothing persists between runs. UNet policies run the forward pass from a DIFFUSION_MODEL wrapper that keeps the
rest of the wrapper chain; DiT caching wraps each block through ``patches_replace["dit"]``, chaining any
replacement another node set before.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from pathlib import Path

import comfy.patcher_extension
import folder_paths
from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
from comfy.ldm.modules.diffusionmodules.util import timestep_embedding

from ..caching.block_profile import profile_file_name
from ..caching.unet_runner import run_unet, unhandled_patches
from ..utils.sigma_window import SigmaWindow, check_percents
from ._host import RunState, install_hooks
from ._inputs import PreprintNode, percent_window_inputs

log = logging.getLogger("preprint.caching")

CATEGORY = "Preprint/caching"
DEEPCACHE = "DeepCache (Preprint)"
BLOCK_CACHE = "Block Cache (Preprint)"
ENCODER_PROPAGATION = "Encoder Propagation (Preprint)"
DIT_CACHE = "DiT Block Cache (Preprint)"

WMP = comfy.patcher_extension.WrappersMP
UNET_KEYS = ("preprint_deepcache", "preprint_blockcache", "preprint_encoder_propagation")
DIT_KEY = "preprint_dit_cache"
PROFILE_DIR = "preprint_cache_profiles"

# DiT classes whose every block goes through patches_replace["dit"], by attribute holding the blocks. Subclasses
# match too: newer ComfyUI's LTX-2 audio-video model (LTXAVModel) is an LTXVModel whose blocks carry a
# (video, audio) tuple as "img", which DiTCacheRun caches element by element.
DIT_CLASSES = {"Flux": ("double_blocks", "single_blocks"), "Chroma": ("double_blocks", "single_blocks"),
               "HunyuanVideo": ("double_blocks", "single_blocks"), "OpenAISignatureMMDITWrapper": ("joint_blocks",),
               "MMDiT": ("joint_blocks",), "WanModel": ("blocks",), "QwenImageTransformer2DModel":
               ("transformer_blocks",), "LTXVModel": ("transformer_blocks",)}
_KEY_OF_ATTR = {"double_blocks": "double_block", "single_blocks": "single_block", "joint_blocks": "double_block",
                "blocks": "double_block", "transformer_blocks": "double_block"}


# -- the node base ----------------------------------------------------------------------------------------------
def percent_inputs() -> list:
    return percent_window_inputs("Fraction of the run (by noise level) before which every block is computed.",
                                 "Fraction of the run (by noise level) after which every block is computed again.")


class CacheNode(PreprintNode):
    """Base of the cache nodes: every cache has the same percent window, checked once more when the node runs
    (for values that came through links)."""

    @classmethod
    def check_window(cls, start_percent: float, end_percent: float) -> None:
        try:
            check_percents(start_percent, end_percent)
        except ValueError as e:
            raise cls.error(str(e)) from e


def window_of(guider, start_percent: float, end_percent: float) -> SigmaWindow:
    """The run's window, through the model sampling the guider holds (a later node may have patched it)."""
    ms = guider.model_patcher.get_model_object("model_sampling")
    return SigmaWindow.from_percents(ms.percent_to_sigma, start_percent, end_percent)


def profile_path(name: str, node: str = BLOCK_CACHE) -> Path:
    """Where a named profile lives: ComfyUI's output folder / preprint_cache_profiles / NAME.json."""
    try:
        file_name = profile_file_name(name)
    except ValueError as e:
        raise ValueError(f"{node}: {e}") from e
    return Path(folder_paths.get_output_directory()) / PROFILE_DIR / file_name


# -- which models a cache can serve -----------------------------------------------------------------------------
def _model_name(model) -> str:
    return f"{type(model.model).__name__} ({type(model.model.diffusion_model).__name__})"


def require_unet(model, node: str) -> UNetModel:
    dm = model.model.diffusion_model
    if not isinstance(dm, UNetModel):
        raise ValueError(f"{node}: this model is a {_model_name(model)}, not a UNet (SD1.x, SD2.x, SDXL); "
                         f"{node} restructures the UNet's encoder/decoder and cannot serve it. For Flux, SD3 and "
                         f"other transformers use '{DIT_CACHE}'.")
    return dm


def require_single_unet_cache(model, key: str, node: str) -> None:
    others = [k for k in UNET_KEYS if k != key and model.get_wrappers(WMP.DIFFUSION_MODEL, k)]
    if others:
        raise ValueError(f"{node}: this model already has a Preprint UNet cache ({', '.join(others)}); two UNet "
                         "caches would both replace the same forward pass. Keep one of them, or place this node on "
                         "the model before the other cache node.")


def dit_block_keys(model, node: str) -> list[tuple[str, int]]:
    dm = model.model.diffusion_model
    attrs = next((DIT_CLASSES[c.__name__] for c in type(dm).__mro__ if c.__name__ in DIT_CLASSES), None)
    if attrs is None:
        raise ValueError(f"{node}: this model is a {_model_name(model)}; DiT block caching supports "
                         "Flux, Chroma, SD3 (MMDiT), HunyuanVideo, Wan, Qwen-Image, LTXV and LTX-2. For SD1.x / SDXL "
                         f"UNets use '{DEEPCACHE}' or '{BLOCK_CACHE}'.")
    keys = []
    for a in attrs:
        blocks = getattr(dm, a, None)
        if blocks is not None:
            keys += [(_KEY_OF_ATTR[a], i) for i in range(len(blocks))]
    if len(keys) < 2:
        raise ValueError(f"{node}: this {_model_name(model)} has {len(keys)} transformer block(s); caching needs "
                         "at least two (the first block decides whether the others are skipped).")
    return keys


# -- the run, put into ComfyUI's sampling -----------------------------------------------------------------------
class _OuterSample(RunState):
    """A fresh policy run per sampling call (see :class:`RunState`), with its report kept for benchmarks."""

    def __init__(self, key: str, node: str, make_run: Callable):
        def make(guider, sigmas, seed):
            try:
                return make_run(guider, sigmas)
            except ValueError as e:  # a run this sampling call cannot serve (too few sigmas, a linked window...)
                raise ValueError(f"{node}: {e}") from e

        super().__init__(key, make)
        self.last_report: dict | None = None  # read by benchmarks; never used for computation

    def finished(self, run) -> None:
        self.last_report = {"summary": run.summary(), "calls": run.calls, "counts": run.counts}
        log.info("%s", run.summary())
        finisher = getattr(run, "finish", None)
        if finisher is not None:
            finisher()


def _unet_forward(key: str, executor, x, timesteps=None, context=None, y=None, control=None,
                  transformer_options=None, **kwargs):
    to = transformer_options if transformer_options is not None else {}
    run = to.get(key)
    plan = None
    if run is not None and "sigmas" in to:
        # an inert run leaves every call to the stock forward anyway
        unhandled = [] if getattr(run, "inert", False) else unhandled_patches(to)
        if unhandled:
            # our forward replaces the stock one: a patch it does not run would be lost, so this call is not ours
            run.fallback(unhandled)
        else:
            plan = run.plan_for(x, to)
    if plan is None:
        return executor(x, timesteps, context, y, control, to, **kwargs)
    unet = executor.class_obj
    forward = functools.partial(_run_with_plan, unet, plan, run)
    # keep every wrapper inside ours: they see the same call, and our forward replaces only the innermost one
    inner = comfy.patcher_extension.WrapperExecutor.new_class_executor(forward, unet, executor.wrappers,
                                                                      executor.idx + 1)
    return inner.execute(x, timesteps, context, y, control, to, **kwargs)


def _run_with_plan(unet, plan, run, x, timesteps=None, context=None, y=None, control=None, transformer_options=None,
                   **kwargs):
    out = run_unet(unet, plan, timestep_embedding, x, timesteps, context, y, control, transformer_options,
                   counts=run.counts, **kwargs)
    plan.after_call()
    return out


def install_unet(model, key: str, node: str, make_run: Callable) -> None:
    install_hooks(model, key, {WMP.OUTER_SAMPLE: _OuterSample(key, node, make_run),
                               WMP.DIFFUSION_MODEL: functools.partial(_unet_forward, key)})


class _DiTBlockPatch:
    """patches_replace["dit"] entry: routes the block through the run's cache, chaining an earlier replacement."""

    def __init__(self, key: tuple[str, int], previous=None):
        self.key, self.previous = key, previous

    def __call__(self, args: dict, extra: dict) -> dict:
        if self.previous is not None:
            def run_block(a, prev=self.previous):
                return prev(a, extra)
        else:
            run_block = extra["original_block"]
        run = (args.get("transformer_options") or {}).get(DIT_KEY)
        if run is None:
            return run_block(args)
        return run.block(self.key, args, run_block)


def install_dit(model, keys: list[tuple[str, int]], node: str, make_run: Callable) -> None:
    replaces = model.model_options.get("transformer_options", {}).get("patches_replace", {}).get("dit", {})
    for key in keys:
        previous = replaces.get(key)
        while isinstance(previous, _DiTBlockPatch):  # a second cache node replaces ours, never nests it
            previous = previous.previous
        model.set_model_patch_replace(_DiTBlockPatch(key, previous), "dit", key[0], key[1])
    install_hooks(model, DIT_KEY, {WMP.OUTER_SAMPLE: _OuterSample(DIT_KEY, node, make_run)})
