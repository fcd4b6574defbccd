"""Block-caching nodes: DeepCache, Block Caching, encoder propagation (UNets) and DiT block caching.

- DeepCache: Ma et al., "DeepCache: Accelerating Diffusion Models for Free", arXiv:2312.00858.
- Block Caching: Wimbauer et al., "Cache Me if You Can: Accelerating Diffusion Models through Block
  Caching", arXiv:2312.03209.
- Encoder propagation: Li et al., "Faster Diffusion: Rethinking the Role of UNet Encoder in Diffusion
  Models", arXiv:2312.09608.
- DiT block caching: first-block change criterion (as in TeaCache, arXiv:2411.19108) with Adams-Bashforth
  extrapolated residuals (AB-Cache, arXiv:2504.10540).

Host glue only: the policies live in ``caching/``. Per-run state is created in an OUTER_SAMPLE wrapper and put
into that run's (cloned) ``transformer_options``, so nothing persists between runs. UNet policies run the
forward pass from a DIFFUSION_MODEL wrapper that keeps the rest of the wrapper chain; DiT caching wraps each
block through ``patches_replace["dit"]``, chaining any replacement another node set before.
"""

from __future__ import annotations

import functools
import logging
import re
from pathlib import Path

import comfy.patcher_extension
import folder_paths
from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
from comfy.ldm.modules.diffusionmodules.util import timestep_embedding
from comfy_api.latest import io

from ..caching.block_profile import Profile, ProfileError, model_fingerprint
from ..caching.dit import DiTCacheRun
from ..caching.unet_policies import BlockCacheRun, DeepCacheRun, EncoderPropagationRun, Window
from ..caching.unet_runner import run_unet, unhandled_patches
from ._host import RunState

log = logging.getLogger("preprint.caching")

CATEGORY = "Preprint/caching"
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


def _model_name(model) -> str:
    return f"{type(model.model).__name__} ({type(model.model.diffusion_model).__name__})"


def _require_unet(model, node: str) -> UNetModel:
    dm = model.model.diffusion_model
    if not isinstance(dm, UNetModel):
        raise ValueError(f"{node}: this model is a {_model_name(model)}, not a UNet (SD1.x, SD2.x, SDXL); "
                         f"{node} restructures the UNet's encoder/decoder and cannot serve it. For Flux, SD3 and "
                         "other transformers use 'DiT Block Cache (Preprint)'.")
    return dm


def _require_single_unet_cache(model, key: str, node: str) -> None:
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
                         "UNets use 'DeepCache (Preprint)' or 'Block Cache (Preprint)'.")
    keys = []
    for a in attrs:
        blocks = getattr(dm, a, None)
        if blocks is not None:
            keys += [(_KEY_OF_ATTR[a], i) for i in range(len(blocks))]
    if len(keys) < 2:
        raise ValueError(f"{node}: this {_model_name(model)} has {len(keys)} transformer block(s); caching needs "
                         "at least two (the first block decides whether the others are skipped).")
    return keys


def _window(guider, start_percent: float, end_percent: float) -> Window:
    ms = guider.model_patcher.get_model_object("model_sampling")
    return Window(ms.percent_to_sigma(start_percent), ms.percent_to_sigma(end_percent))


class _OuterSample(RunState):
    """A fresh policy run per sampling call (see :class:`RunState`), with its report kept for benchmarks."""

    def __init__(self, key: str, make_run):
        super().__init__(key, lambda guider, sigmas, seed: make_run(guider, sigmas))
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


def _install_unet(model, key: str, make_run) -> None:
    for w in (WMP.OUTER_SAMPLE, WMP.DIFFUSION_MODEL):
        model.remove_wrappers_with_key(w, key)
    model.add_wrapper_with_key(WMP.OUTER_SAMPLE, key, _OuterSample(key, make_run))
    model.add_wrapper_with_key(WMP.DIFFUSION_MODEL, key, functools.partial(_unet_forward, key))


def _percent_inputs() -> list:
    return [
        io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.01,
                       tooltip="Fraction of the run (by noise level) before which every block is computed."),
        io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.01,
                       tooltip="Fraction of the run (by noise level) after which every block is computed again."),
    ]


def _check_percents(start_percent, end_percent) -> bool | str:
    if start_percent is None or end_percent is None:
        return True
    if not (0.0 <= start_percent <= 1.0 and 0.0 <= end_percent <= 1.0):
        return "start_percent and end_percent must lie in [0, 1]."
    if start_percent > end_percent:
        return (f"start_percent ({start_percent}) is after end_percent ({end_percent}): caching would never be "
                "active. Set start_percent <= end_percent.")
    return True


# --------------------------------------------------------------------------------------------------------------
class PreprintDeepCache(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PreprintDeepCache",
            display_name="DeepCache (Preprint)",
            category=CATEGORY,
            description=(
                "DeepCache (Ma et al., 'DeepCache: Accelerating Diffusion Models for Free', arXiv:2312.00858) for "
                "SD1.x / SD2.x / SDXL UNets: the deep features are recomputed only every N steps and reused in "
                "between, where only the shallow skip branch runs. About 2-3x faster at interval 3. Steps are "
                "keyed by noise level, so Heun / 2S samplers, ControlNet, batches, LoRA and perturbed-attention "
                "guidance all work; interval 1 is exactly the uncached model."),
            inputs=[
                io.Model.Input("model", tooltip="A UNet model (SD1.x, SD2.x, SDXL)."),
                io.Int.Input("cache_interval", default=3, min=1, max=50,
                             tooltip="Recompute the deep features every N steps (1 = no caching). 3 is the "
                                     "paper's quality / speed balance; 5 is faster and softer."),
                io.Int.Input("branch_depth", default=0, min=0, max=20,
                             tooltip="How many blocks of the shallow branch run on cached steps (0 = only the "
                                     "stem and the last output block, fastest). Deeper branches keep more detail."),
                io.Combo.Input("schedule", options=["uniform", "non-uniform"], default="uniform",
                               tooltip="uniform: refresh every N steps. non-uniform: the same number of refreshes "
                                       "packed around 30% of the run, where features change fastest (paper Sec. "
                                       "3.3); better at large intervals."),
                *_percent_inputs(),
            ],
            outputs=[io.Model.Output(tooltip="The model with DeepCache; stack it with LoRA, PAG and others.")],
        )

    @classmethod
    def validate_inputs(cls, start_percent=None, end_percent=None, **kwargs) -> bool | str:
        return _check_percents(start_percent, end_percent)

    @classmethod
    def execute(cls, model, cache_interval: int, branch_depth: int, schedule: str, start_percent: float,
                end_percent: float) -> io.NodeOutput:
        node = "DeepCache (Preprint)"
        unet = _require_unet(model, node)
        n = len(unet.output_blocks)
        if branch_depth > n - 2:
            raise ValueError(f"{node}: branch_depth {branch_depth} is too deep for this UNet ({n} output blocks); "
                             f"choose 0 to {n - 2}.")
        _require_single_unet_cache(model, "preprint_deepcache", node)
        model = model.clone()

        def make_run(guider, sigmas):
            return DeepCacheRun(guider.model_patcher.model.diffusion_model, sigmas, cache_interval, branch_depth,
                                schedule, _window(guider, start_percent, end_percent))

        _install_unet(model, "preprint_deepcache", make_run)
        return io.NodeOutput(model)


# --------------------------------------------------------------------------------------------------------------
_NAME_OK = re.compile(r"^[A-Za-z0-9_.\- ]{1,120}$")


def profile_path(name: str) -> Path:
    """Where a named profile lives: ComfyUI's output folder / preprint_cache_profiles / NAME.json."""
    name = name.strip()
    if name.endswith(".json"):
        name = name[:-5]
    if not _NAME_OK.match(name) or name.startswith("."):
        raise ValueError(f"Block Cache (Preprint): profile name {name!r} is not a plain file name; use letters, "
                         "digits, spaces, '-', '_' or '.', without folders.")
    return Path(folder_paths.get_output_directory()) / PROFILE_DIR / f"{name}.json"


class PreprintBlockCache(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PreprintBlockCache",
            display_name="Block Cache (Preprint)",
            category=CATEGORY,
            description=(
                "Block Caching (Wimbauer et al., 'Cache Me if You Can: Accelerating Diffusion Models through "
                "Block Caching', arXiv:2312.03209) for SD1.x / SD2.x / SDXL UNets: each block is reused while its "
                "output is predicted to change less than a threshold since it was last computed. Calibrate once "
                "(mode 'calibrate' saves a small profile of every block's rate of change) and reuse the profile "
                "at any step count, or let it decide online. Threshold 0 is exactly the uncached model."),
            inputs=[
                io.Model.Input("model", tooltip="A UNet model (SD1.x, SD2.x, SDXL)."),
                io.Combo.Input("mode", options=["online", "calibrate", "profile"], default="online",
                               tooltip="online: measure each block's change while sampling and decide on the fly. "
                                       "calibrate: compute everything this run and save a profile under "
                                       "profile_name. profile: decide from a saved profile (steadier, fewer "
                                       "surprises across prompts)."),
                io.Float.Input("threshold", default=0.3, min=0.0, max=5.0, step=0.01,
                               tooltip="Largest relative L1 change of a block's output (paper Eq. 1) accepted "
                                       "before it is recomputed. 0 = never reuse; 0.2-0.5 is a good range; higher "
                                       "is faster and softer."),
                io.String.Input("profile_name", default="block_cache_profile",
                                tooltip="Profile file name (saved in and loaded from ComfyUI's output folder, "
                                        "sub-folder preprint_cache_profiles). Used by 'calibrate' and 'profile'."),
                *_percent_inputs(),
            ],
            outputs=[io.Model.Output(tooltip="The model with Block Caching; stack it with LoRA, PAG and others.")],
        )

    @classmethod
    def validate_inputs(cls, start_percent=None, end_percent=None, **kwargs) -> bool | str:
        return _check_percents(start_percent, end_percent)

    @classmethod
    def execute(cls, model, mode: str, threshold: float, profile_name: str, start_percent: float,
                end_percent: float) -> io.NodeOutput:
        node = "Block Cache (Preprint)"
        unet = _require_unet(model, node)
        _require_single_unet_cache(model, "preprint_blockcache", node)
        fingerprint = model_fingerprint(unet)
        described = (f"{type(unet).__name__} with {len(unet.input_blocks)} input blocks, {unet.model_channels} "
                     f"channels ({type(model.model).__name__})")
        profile = None
        path = profile_path(profile_name) if mode != "online" else None
        if mode == "profile":
            try:
                profile = Profile.load(path)
                profile.check_model(fingerprint, described)
            except ProfileError as e:
                raise ValueError(f"{node}: {e}") from e
        model = model.clone()

        def make_run(guider, sigmas):
            run = BlockCacheRun(guider.model_patcher.model.diffusion_model, sigmas, mode, threshold, profile,
                                _window(guider, start_percent, end_percent))
            if mode == "calibrate":
                def finish(run=run):
                    prof = run.calibrator.profile(fingerprint, described, run.clock.steps)
                    prof.save(path)
                    log.info("Block Cache: saved profile for %s to %s", described, path)
                    run.store.clear()
                run.finish = finish
            return run

        _install_unet(model, "preprint_blockcache", make_run)
        return io.NodeOutput(model)


# --------------------------------------------------------------------------------------------------------------
class PreprintEncoderPropagation(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PreprintEncoderPropagation",
            display_name="Encoder Propagation (Preprint)",
            category=CATEGORY,
            description=(
                "Encoder propagation from 'Faster Diffusion: Rethinking the Role of UNet Encoder in Diffusion "
                "Models' (Li et al., arXiv:2312.09608) for SD1.x / SD2.x / SDXL UNets: the encoder (input and "
                "middle blocks) runs only on key steps; in between its features are reused and only the decoder "
                "runs. Gentler than DeepCache, about 1.3-1.5x."),
            inputs=[
                io.Model.Input("model", tooltip="A UNet model (SD1.x, SD2.x, SDXL)."),
                io.Combo.Input("key_steps", options=["non-uniform", "uniform"], default="non-uniform",
                               tooltip="non-uniform: the paper's key steps (dense at the start, sparse later), "
                                       "rescaled to your step count. uniform: a key step every key_interval steps."),
                io.Int.Input("key_interval", default=2, min=1, max=50,
                             tooltip="With uniform key steps: run the encoder every N steps (1 = no caching)."),
                *_percent_inputs(),
            ],
            outputs=[io.Model.Output(tooltip="The model with encoder propagation.")],
        )

    @classmethod
    def validate_inputs(cls, start_percent=None, end_percent=None, **kwargs) -> bool | str:
        return _check_percents(start_percent, end_percent)

    @classmethod
    def execute(cls, model, key_steps: str, key_interval: int, start_percent: float,
                end_percent: float) -> io.NodeOutput:
        node = "Encoder Propagation (Preprint)"
        _require_unet(model, node)
        _require_single_unet_cache(model, "preprint_encoder_propagation", node)
        model = model.clone()
        interval = key_interval if key_steps == "uniform" else None

        def make_run(guider, sigmas):
            return EncoderPropagationRun(guider.model_patcher.model.diffusion_model, sigmas, interval,
                                         _window(guider, start_percent, end_percent))

        _install_unet(model, "preprint_encoder_propagation", make_run)
        return io.NodeOutput(model)


# --------------------------------------------------------------------------------------------------------------
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


class PreprintDiTBlockCache(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PreprintDiTBlockCache",
            display_name="DiT Block Cache (Preprint)",
            category=CATEGORY,
            description=(
                "Block caching for diffusion transformers (Flux, SD3, Chroma, HunyuanVideo, Wan, Qwen-Image, "
                "LTXV, LTX-2 audio-video). The first block always runs; when its output changed less than the "
                "threshold since the last full step, the other blocks are skipped and their residuals extrapolated "
                "with Adams-Bashforth weights ('AB-Cache', arXiv:2504.10540) instead of copied; the first-block "
                "criterion follows TeaCache (arXiv:2411.19108). Cond and uncond keep separate caches. Threshold 0 "
                "is exactly the uncached model."),
            inputs=[
                io.Model.Input("model", tooltip="A DiT model (Flux, SD3, Chroma, HunyuanVideo, Wan, Qwen-Image, "
                                                "LTXV, LTX-2)."),
                io.Float.Input("threshold", default=0.12, min=0.0, max=2.0, step=0.01,
                               tooltip="Largest relative L1 change of the first block's residual, against the last "
                                       "full step, for which the other blocks are skipped. 0 = never skip; 0.08-0.2 "
                                       "is typical; higher is faster and softer."),
                io.Int.Input("extrapolation_order", default=2, min=1, max=3,
                             tooltip="1: reuse the last residual (plain caching). 2: linear Adams-Bashforth "
                                     "extrapolation (default). 3: quadratic; best for long runs with many steps."),
                io.Int.Input("max_consecutive_skips", default=3, min=1, max=20,
                             tooltip="Force a full step after this many skipped ones, so errors cannot pile up."),
                *_percent_inputs(),
            ],
            outputs=[io.Model.Output(tooltip="The model with DiT block caching.")],
        )

    @classmethod
    def validate_inputs(cls, start_percent=None, end_percent=None, **kwargs) -> bool | str:
        return _check_percents(start_percent, end_percent)

    @classmethod
    def execute(cls, model, threshold: float, extrapolation_order: int, max_consecutive_skips: int,
                start_percent: float, end_percent: float) -> io.NodeOutput:
        keys = dit_block_keys(model, "DiT Block Cache (Preprint)")
        model = model.clone()
        replaces = model.model_options.get("transformer_options", {}).get("patches_replace", {}).get("dit", {})
        for key in keys:
            previous = replaces.get(key)
            while isinstance(previous, _DiTBlockPatch):  # a second cache node replaces ours, never nests it
                previous = previous.previous
            model.set_model_patch_replace(_DiTBlockPatch(key, previous), "dit", key[0], key[1])

        def make_run(guider, sigmas):
            w = _window(guider, start_percent, end_percent)
            return DiTCacheRun(sigmas, keys, threshold, extrapolation_order, max_consecutive_skips,
                               w.sigma_start, w.sigma_end)

        model.remove_wrappers_with_key(WMP.OUTER_SAMPLE, DIT_KEY)
        model.add_wrapper_with_key(WMP.OUTER_SAMPLE, DIT_KEY, _OuterSample(DIT_KEY, make_run))
        return io.NodeOutput(model)


NODES = [PreprintDeepCache, PreprintBlockCache, PreprintEncoderPropagation, PreprintDiTBlockCache]
