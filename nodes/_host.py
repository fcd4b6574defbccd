"""Small adapters between ComfyUI's runtime objects and the pure-torch families."""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Callable

import comfy.k_diffusion.sampling as k_sampling
import comfy.ldm.modules.attention as comfy_attention
import comfy.model_patcher
import comfy.model_sampling
import comfy.ops
import comfy.patcher_extension as pe
import comfy.samplers

from ..guidance import cfg_runtime
from ..guidance.cads import content_key
from ..guidance.pag_runtime import Host
from ..utils.noise_schedule import Parameterisation

log = logging.getLogger("preprint")


def validation_message(node: str, check: Callable[[], object]) -> bool | str:
    """For a node's ``validate_inputs``: True, or the ValueError ``check`` raises prefixed with the node's display
    name, which ComfyUI's validator shows on the node before anything is queued."""
    try:
        check()
    except ValueError as e:
        return f"{node}: {e}"
    return True


def install_hooks(model, key: str, wrappers: dict, pre_cfg: Callable | None = None,
                  post_cfg: Callable | None = None) -> None:
    """Install keyed wrappers (``{WrappersMP kind: fn}``) and pre- / post-CFG functions on a cloned patcher,
    replacing those an earlier node installed under the same ``key`` (so two such nodes do not apply twice) and
    keeping everything else, in order."""
    for kind, fn in wrappers.items():
        model.remove_wrappers_with_key(kind, key)
        model.add_wrapper_with_key(kind, key, fn)
    for slot, fn in (("sampler_pre_cfg_function", pre_cfg), ("sampler_post_cfg_function", post_cfg)):
        if fn is not None:
            fn.preprint_key = key
            kept = [f for f in model.model_options.get(slot, []) if getattr(f, "preprint_key", None) != key]
            model.model_options[slot] = [*kept, fn]


# transformer_options entry listing the nodes on a model whose masks cover the whole frame and do not follow tiles
# (Regional Prompting on SD3 or with regional LoRA): Tiled Diffusion refuses to split such a model's calls into tiles
# (the masks would be squeezed onto each tile)
FRAME_MASKS = "preprint_frame_masks"


def mark_frame_masks(model, name: str) -> None:
    """Record on a cloned patcher that node ``name`` places masks on the whole frame (see ``FRAME_MASKS``)."""
    to = model.model_options.setdefault("transformer_options", {})
    names = list(to.get(FRAME_MASKS, ()))
    if name not in names:
        to[FRAME_MASKS] = [*names, name]


class RunState:
    """OUTER_SAMPLE wrapper giving every sampling call a fresh state object, put into that call's cloned
    ``transformer_options`` under ``key`` (so patches find it there) and dropped when the call returns.

    ``make_run(guider, sigmas, seed)`` builds the state; ``seed`` is the run's noise seed, or a fingerprint of
    the noise when the sampler passes none. ``finish(run)``, if given, is called once the sampling call returned
    (or failed)."""

    def __init__(self, key: str, make_run: Callable, finish: Callable | None = None):
        self.key, self.make_run, self.finish = key, make_run, finish

    def __call__(self, executor, noise, latent_image, sampler, sigmas, *args, **kwargs):
        guider = executor.class_obj
        orig = guider.model_options
        guider.model_options = comfy.model_patcher.create_model_options_clone(orig)
        seed = kwargs.get("seed", args[3] if len(args) > 3 else None)  # outer_sample(..., disable_pbar, seed)
        run = self.make_run(guider, sigmas, int(seed) if seed is not None else content_key(noise))
        guider.model_options.setdefault("transformer_options", {})[self.key] = run
        try:
            return executor(noise, latent_image, sampler, sigmas, *args, **kwargs)
        finally:
            guider.model_options = orig
            self.finished(run)

    def finished(self, run) -> None:
        """Called once the sampling call returned (or failed); subclasses may override it."""
        if self.finish is not None and run is not None:
            self.finish(run)


def _is_flow(model_sampling) -> bool:
    return parameterisation_of(model_sampling) == "flow"


def attention(q, k, v, heads, attn_precision=None, transformer_options=None):
    """ComfyUI's attention, looked up at call time (it picks its implementation at start-up); with the call's
    ``transformer_options`` an attention override another node set still applies."""
    return comfy_attention.optimized_attention(q, k, v, heads, attn_precision=attn_precision,
                                               transformer_options=transformer_options)


# newer ComfyUI casts with an optional offload stream that must be handed back; detected once
_OFFLOADABLE = "offloadable" in inspect.signature(comfy.ops.cast_bias_weight).parameters


def cast_weights(op, x) -> tuple:
    """A ComfyUI layer's ``(weight, bias, offload)`` on ``x``'s device and dtype; hand them back with
    :func:`uncast_weights`."""
    out = comfy.ops.cast_bias_weight(op, x, offloadable=True) if _OFFLOADABLE else comfy.ops.cast_bias_weight(op, x)
    return out if len(out) == 3 else (*out, None)


def uncast_weights(op, weight, bias, offload) -> None:
    if offload is not None and hasattr(comfy.ops, "uncast_bias_weight"):
        comfy.ops.uncast_bias_weight(op, weight, bias, offload)


def _calc_cond_batch(model, conds, x, sigma, model_options):
    return comfy.samplers.calc_cond_batch(model, conds, x, sigma, model_options)


# ComfyUI's functions as the perturbed-attention engine (guidance/pag_runtime.py) calls them
HOST = Host(attention=attention, calc_cond_batch=_calc_cond_batch, is_flow=_is_flow,
            apply_model=pe.WrappersMP.APPLY_MODEL)


def _combines_with_cfg(guider) -> bool:
    return type(guider).predict_noise is comfy.samplers.CFGGuider.predict_noise


def _parameterisation(model_sampling) -> str:
    return parameterisation_of(model_sampling)


# ComfyUI's functions as the CFG family's engine (guidance/cfg_runtime.py) calls them
CFG_HOST = cfg_runtime.Host(parameterisation=_parameterisation, combines_with_cfg=_combines_with_cfg)


def model_sampling_of(model_k) -> object:
    """The ``model_sampling`` object behind the denoiser ComfyUI hands a sampler function.

    ComfyUI passes ``KSamplerX0Inpaint(guider)``; the guider holds the ModelPatcher, which may carry a
    patched ``model_sampling`` (ModelSamplingFlux, ModelSamplingSD3...), so ask the patcher, as core does.
    """
    patcher = getattr(getattr(model_k, "inner_model", None), "model_patcher", None)
    if patcher is None:
        raise TypeError(
            "Preprint sampler: the model passed to the sampler is not one ComfyUI's samplers produce; "
            "run Preprint samplers through KSampler, SamplerCustom or SamplerCustomAdvanced."
        )
    return patcher.get_model_object("model_sampling")


def parameterisation_of(model_sampling: object) -> Parameterisation:
    """``"flow"`` for rectified-flow (CONST) models such as Flux and SD3, ``"eps"`` for EPS / V-prediction."""
    if isinstance(model_sampling, comfy.model_sampling.CONST):
        return "flow"
    return "eps"


def with_model_parameterisation(fn: Callable) -> Callable:
    """Wrap a pure sampler so it learns the model's parameterisation from ComfyUI at call time."""

    @functools.wraps(fn)
    def sampler(model, x, sigmas, extra_args=None, callback=None, disable=None, **options):
        kind = parameterisation_of(model_sampling_of(model))
        return fn(model, x, sigmas, extra_args=extra_args, callback=callback, disable=disable,
                  parameterisation=kind, **options)

    return sampler


def register_ksampler_name(name: str, fn: Callable) -> None:
    """Add a sampler to the stock KSampler / KSamplerSelect dropdowns (the pack's one global change).

    ComfyUI resolves a KSampler name ``n`` to ``comfy.k_diffusion.sampling.sample_n``; the name lists are
    shared list objects, so appending once makes the name appear in every stock node.
    """
    setattr(k_sampling, f"sample_{name}", fn)
    for names in (comfy.samplers.KSAMPLER_NAMES, comfy.samplers.SAMPLER_NAMES):
        if name not in names:
            names.append(name)


CALIBRATION_FOLDER = "preprint_calibration"


def calibration_folder() -> str:
    """Where calibrations computed on the user's model are saved: ``PREPRINT_CALIBRATION_DIR`` when set, else the
    ``preprint_calibration`` folder of ComfyUI's models directory (registered with ``folder_paths`` so an
    ``extra_model_paths.yaml`` entry of that name is honoured too; the first folder listed is written to)."""
    import os

    import folder_paths

    override = os.environ.get("PREPRINT_CALIBRATION_DIR")
    if override:
        return override
    if CALIBRATION_FOLDER not in folder_paths.folder_names_and_paths:
        folder_paths.folder_names_and_paths[CALIBRATION_FOLDER] = (
            [os.path.join(folder_paths.models_dir, CALIBRATION_FOLDER)], {".safetensors"})
    return folder_paths.get_folder_paths(CALIBRATION_FOLDER)[0]


def _patch_tensors(value, path: str = ""):
    """Every tensor inside a weight patch (LoRA adapters hold them in tuples or a ``weights`` attribute)."""
    import torch

    if torch.is_tensor(value):
        yield path, value
    elif isinstance(value, (tuple, list)):
        for i, item in enumerate(value):
            yield from _patch_tensors(item, f"{path}.{i}")
    elif hasattr(value, "weights"):
        yield from _patch_tensors(value.weights, f"{path}.w")


def model_fingerprint(model) -> str:
    """A calibration key for a MODEL (patcher): the diffusion model's own weights (sampled, see
    ``utils.calibration_store.fingerprint``), the weight patches on the patcher (LoRA tensors and strengths: a LoRA
    at another strength is another model) and its hook patches, and the sampling type with its sigma range (a shift
    is another schedule).

    The same before and after ComfyUI loads the model: loading writes patches into the weights in place and keeps
    the originals in ``model.backup``, which is read instead."""
    from ..utils.calibration_store import fingerprint

    backup = getattr(model, "backup", {}) or {}

    def weights():
        for name, tensor in model.model.diffusion_model.state_dict().items():
            saved = backup.get(f"diffusion_model.{name}")
            yield name, saved.weight if saved is not None else tensor

    patch_items = []
    for key, entries in getattr(model, "patches", {}).items():
        for i, p in enumerate(entries):
            patch_items.append((f"{key}#{i}|{float(p[0])}|{float(p[2]) if len(p) > 2 else 1.0}", p[1]))
    for ref, patches in (getattr(model, "hook_patches", {}) or {}).items():
        for key, entries in patches.items():
            for i, p in enumerate(entries):
                patch_items.append((f"hook:{getattr(ref, 'hook_id', ref)}|{key}#{i}|{float(p[0])}", p[1]))
    patch_tensors = [(f"{label}{sub}", t) for label, value in patch_items for sub, t in _patch_tensors(value)]
    sampling = model.get_model_object("model_sampling")
    extra = {"patches": sorted(label for label, _ in patch_items),
             "patch_values": fingerprint(patch_tensors) if patch_tensors else "",
             "sampling": type(sampling).__name__,
             "sigma_min": float(sampling.sigma_min), "sigma_max": float(sampling.sigma_max)}
    return fingerprint(weights(), extra)


def with_guided_denoiser(model, positive, negative, cfg: float, noise, latent, sigmas, seed: int, work: Callable):
    """Run ``work(denoise, x, sigmas)`` with ComfyUI's own CFG guider as the denoiser, inside a sampling call that
    never steps (so every wrapper, hook and patch on the model is set up as in a real run), and return its result.
    ``denoise(x, sigma)`` is the guided x0 prediction of the run; ``x`` and ``sigmas`` are the run's own (on the
    run's device). Used by the nodes that calibrate on the user's model."""
    found = {}

    def calibrating_sampler(model_k, x, sigmas_in, extra_args=None, callback=None, disable=None):
        extra = extra_args or {}
        found["result"] = work(lambda xx, s: model_k(xx, s, **extra), x, sigmas_in)
        return x

    guider = comfy.samplers.CFGGuider(model)
    guider.set_conds(positive, negative)
    guider.set_cfg(cfg)
    guider.sample(noise, latent, comfy.samplers.KSAMPLER(calibrating_sampler), sigmas, seed=seed, disable_pbar=True)
    return found["result"]


def run_cfg(model_k) -> float | None:
    """The CFG scale of the run a sampler function was handed (ComfyUI's KSamplerX0Inpaint around the guider):
    CFGGuider's scale (KSampler, CFGGuider), 1 for BasicGuider (one prompt, no guidance), None for any other guider.
    Other guiders subclass CFGGuider and inherit its default ``cfg`` of 1 (DualCFGGuider keeps its two scales
    elsewhere), so only these two exact classes are trusted."""
    guider = getattr(model_k, "inner_model", None)
    cfg = getattr(guider, "cfg", None)
    if type(guider) is comfy.samplers.CFGGuider and isinstance(cfg, (int, float)):
        return float(cfg)
    if type(guider).__name__ == "Guider_Basic":  # core's BasicGuider node
        return 1.0
    return None
