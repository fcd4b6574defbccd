"""Block-caching nodes: DeepCache, Block Caching, encoder propagation (UNets) and DiT block caching.

- DeepCache: Ma et al., "DeepCache: Accelerating Diffusion Models for Free", arXiv:2312.00858.
- Block Caching: Wimbauer et al., "Cache Me if You Can: Accelerating Diffusion Models through Block
  Caching", arXiv:2312.03209.
- Encoder propagation: Li et al., "Faster Diffusion: Rethinking the Role of UNet Encoder in Diffusion
  Models", arXiv:2312.09608.
- DiT block caching: first-block change criterion (as in TeaCache, arXiv:2411.19108) with Adams-Bashforth
  extrapolated residuals (AB-Cache, arXiv:2504.10540).

The node classes: schemas, checks and the runs they build. The policies live in ``caching/``; the glue that puts
a run into ComfyUI's sampling, and the base the nodes share, in ``nodes/_caching_host.py``.
"""

from __future__ import annotations

import logging

from comfy_api.latest import io

from ..caching.block_profile import Profile, ProfileError, model_fingerprint
from ..caching.dit import DiTCacheRun
from ..caching.unet_policies import BlockCacheRun, DeepCacheRun, EncoderPropagationRun
from ._caching_host import (
    BLOCK_CACHE,
    CATEGORY,
    DEEPCACHE,
    DIT_CACHE,
    ENCODER_PROPAGATION,
    CacheNode,
    dit_block_keys,
    install_dit,
    install_unet,
    percent_inputs,
    profile_path,
    require_single_unet_cache,
    require_unet,
    window_of,
)

log = logging.getLogger("preprint.caching")


class PreprintDeepCache(CacheNode):
    NAME = DEEPCACHE
    ALIASES = ("DeepCache", "cache", "speed up", "faster")

    @classmethod
    def define_schema(cls) -> io.Schema:
        return cls.schema(
            node_id="PreprintDeepCache",
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
                *percent_inputs(),
            ],
            outputs=[io.Model.Output(tooltip="The model with DeepCache; stack it with LoRA, PAG and others.")],
        )

    @classmethod
    def validate_inputs(cls, cache_interval=None, schedule=None, start_percent=None, end_percent=None) -> bool | str:
        return cls.check_widgets(cache_interval=cache_interval, schedule=schedule, start_percent=start_percent,
                                 end_percent=end_percent)

    @classmethod
    def execute(cls, model, cache_interval: int, branch_depth: int, schedule: str, start_percent: float,
                end_percent: float) -> io.NodeOutput:
        unet = require_unet(model, cls.NAME)
        n = len(unet.output_blocks)
        if branch_depth > n - 2:
            raise cls.error(f"branch_depth {branch_depth} is too deep for this UNet ({n} output blocks); choose 0 "
                            f"to {n - 2}.")
        require_single_unet_cache(model, "preprint_deepcache", cls.NAME)
        cls.check_window(start_percent, end_percent)
        model = model.clone()

        def make_run(guider, sigmas):
            return DeepCacheRun(guider.model_patcher.model.diffusion_model, sigmas, cache_interval, branch_depth,
                                schedule, window_of(guider, start_percent, end_percent))

        install_unet(model, "preprint_deepcache", cls.NAME, make_run)
        return io.NodeOutput(model)


class PreprintBlockCache(CacheNode):
    NAME = BLOCK_CACHE
    ALIASES = ("block caching", "cache", "speed up", "faster")

    @classmethod
    def define_schema(cls) -> io.Schema:
        return cls.schema(
            node_id="PreprintBlockCache",
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
                *percent_inputs(),
            ],
            outputs=[io.Model.Output(tooltip="The model with Block Caching; stack it with LoRA, PAG and others.")],
        )

    @classmethod
    def validate_inputs(cls, mode=None, threshold=None, profile_name=None, start_percent=None,
                        end_percent=None) -> bool | str:
        return cls.check_widgets(mode=mode, threshold=threshold, profile_name=profile_name,
                                 start_percent=start_percent, end_percent=end_percent)

    @classmethod
    def check_values(cls, mode=None, profile_name=None, **_) -> None:
        if mode is not None and mode != "online" and profile_name is not None:  # online mode reads no profile
            profile_path(profile_name, cls.NAME)

    @classmethod
    def execute(cls, model, mode: str, threshold: float, profile_name: str, start_percent: float,
                end_percent: float) -> io.NodeOutput:
        unet = require_unet(model, cls.NAME)
        require_single_unet_cache(model, "preprint_blockcache", cls.NAME)
        cls.check_window(start_percent, end_percent)
        fingerprint = model_fingerprint(unet)
        described = (f"{type(unet).__name__} with {len(unet.input_blocks)} input blocks, {unet.model_channels} "
                     f"channels ({type(model.model).__name__})")
        profile = None
        path = profile_path(profile_name, cls.NAME) if mode != "online" else None
        if mode == "profile":
            try:
                profile = Profile.load(path)
                profile.check_model(fingerprint, described)
            except ProfileError as e:
                raise cls.error(str(e)) from e
        model = model.clone()

        def make_run(guider, sigmas):
            run = BlockCacheRun(guider.model_patcher.model.diffusion_model, sigmas, mode, threshold, profile,
                                window_of(guider, start_percent, end_percent))
            if mode == "calibrate":
                def finish(run=run):
                    prof = run.calibrator.profile(fingerprint, described, run.clock.steps)
                    prof.save(path)
                    log.info("Block Cache: saved profile for %s to %s", described, path)
                    run.store.clear()
                run.finish = finish
            return run

        install_unet(model, "preprint_blockcache", cls.NAME, make_run)
        return io.NodeOutput(model)


class PreprintEncoderPropagation(CacheNode):
    NAME = ENCODER_PROPAGATION
    ALIASES = ("Faster Diffusion", "encoder propagation", "cache", "speed up")

    @classmethod
    def define_schema(cls) -> io.Schema:
        return cls.schema(
            node_id="PreprintEncoderPropagation",
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
                *percent_inputs(),
            ],
            outputs=[io.Model.Output(tooltip="The model with encoder propagation.")],
        )

    @classmethod
    def validate_inputs(cls, key_steps=None, key_interval=None, start_percent=None, end_percent=None) -> bool | str:
        return cls.check_widgets(key_steps=key_steps, key_interval=key_interval, start_percent=start_percent,
                                 end_percent=end_percent)

    @classmethod
    def execute(cls, model, key_steps: str, key_interval: int, start_percent: float,
                end_percent: float) -> io.NodeOutput:
        require_unet(model, cls.NAME)
        require_single_unet_cache(model, "preprint_encoder_propagation", cls.NAME)
        cls.check_window(start_percent, end_percent)
        model = model.clone()
        interval = key_interval if key_steps == "uniform" else None

        def make_run(guider, sigmas):
            return EncoderPropagationRun(guider.model_patcher.model.diffusion_model, sigmas, interval,
                                         window_of(guider, start_percent, end_percent))

        install_unet(model, "preprint_encoder_propagation", cls.NAME, make_run)
        return io.NodeOutput(model)


class PreprintDiTBlockCache(CacheNode):
    NAME = DIT_CACHE
    ALIASES = ("TeaCache", "FBCache", "first block cache", "DiT cache", "Flux cache", "speed up")

    @classmethod
    def define_schema(cls) -> io.Schema:
        return cls.schema(
            node_id="PreprintDiTBlockCache",
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
                               tooltip="The other blocks are skipped while the first block's residual has changed "
                                       "by less than this (relative L1, against the last full step). 0 = never "
                                       "skip; 0.08-0.2 "
                                       "is typical; higher is faster and softer."),
                io.Int.Input("extrapolation_order", default=2, min=1, max=3,
                             tooltip="1: reuse the last residual (plain caching). 2: linear Adams-Bashforth "
                                     "extrapolation (default). 3: quadratic; best for long runs with many steps."),
                io.Int.Input("max_consecutive_skips", default=3, min=1, max=20,
                             tooltip="Force a full step after this many skipped ones, so errors cannot pile up."),
                *percent_inputs(),
            ],
            outputs=[io.Model.Output(tooltip="The model with DiT block caching.")],
        )

    @classmethod
    def validate_inputs(cls, threshold=None, extrapolation_order=None, start_percent=None,
                        end_percent=None) -> bool | str:
        return cls.check_widgets(threshold=threshold, extrapolation_order=extrapolation_order,
                                 start_percent=start_percent, end_percent=end_percent)

    @classmethod
    def execute(cls, model, threshold: float, extrapolation_order: int, max_consecutive_skips: int,
                start_percent: float, end_percent: float) -> io.NodeOutput:
        keys = dit_block_keys(model, cls.NAME)
        cls.check_window(start_percent, end_percent)
        model = model.clone()

        def make_run(guider, sigmas):
            return DiTCacheRun(sigmas, keys, threshold, extrapolation_order, max_consecutive_skips,
                               window_of(guider, start_percent, end_percent))

        install_dit(model, keys, cls.NAME, make_run)
        return io.NodeOutput(model)


NODES = [PreprintDeepCache, PreprintBlockCache, PreprintEncoderPropagation, PreprintDiTBlockCache]
