"""HiDiffusion's patches on a running UNet (plain torch; ComfyUI's functions are passed in as a ``Host``).

The run (``hidiffusion.HiDiffusionRun``) lives in the run's cloned ``transformer_options`` under ``KEY``; every
patch here reads it from there and does nothing outside a run:

- the Downsample handler of ``forward_timestep_embed_patch``: the layout's strided block at stride 4 with
  dilation 2 while RAU-Net's first part is on;
- ``input_block_patch`` / ``output_block_patch``: 2x2 pooling one level down and its undoing, and ControlNet
  residuals resized to the features they meet;
- a DIFFUSION_MODEL wrapper that, while RAU-Net changes feature sizes, takes the ControlNet residuals out of
  ComfyUI's hands so the block patches add them, resized;
- an ``attn1`` replacement on the top self-attention layers: MSW-MSA (shifted 2x2 windows) during a run.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .hidiffusion import HiDiffusionRun, layer_index, pool, resize_to, strided_conv, windowed_attention

KEY = "preprint_hidiffusion"
CONTROL_KEY = "preprint_hidiffusion_control"


@dataclass(frozen=True)
class Host:
    attention: Callable  # (q, k, v, heads, attn_precision=None) -> ComfyUI's attention output
    cast: Callable  # (op, x) -> (weight, bias, offload): the layer's weights on x's device and dtype
    uncast: Callable  # (op, weight, bias, offload): hand back what cast lent


def run_of(options: dict | None) -> HiDiffusionRun | None:
    return options.get(KEY) if options else None


def _active(options: dict) -> HiDiffusionRun | None:
    """The run, when this call belongs to one (the host puts the call's sigmas next to it)."""
    run = run_of(options)
    return run if run is not None and "sigmas" in options else None


def diffusion_model(executor, x, timesteps=None, context=None, y=None, control=None, transformer_options=None,
                    **kwargs):
    """While RAU-Net reshapes features, hand ControlNet residuals to the block patches (resized there)."""
    to = transformer_options if transformer_options is not None else {}
    run = _active(to)
    if run is not None and not run.configured:
        run.configure(*x.shape[-2:])  # the 'auto' preset, from the latent's size
    if run is not None and control is not None and run.reshaping(to["sigmas"]):
        stash = {k: list(control.get(k) or []) for k in ("input", "middle", "output")}
        control = {k: ([] if k in stash else v) for k, v in control.items()}
        to = {**to, CONTROL_KEY: stash}
    return executor(x, timesteps, context, y, control, to, **kwargs)


def _add_control(h, stash: dict | None, name: str):
    if not stash or not stash.get(name):
        return h
    ctrl = stash[name].pop()
    if ctrl is None:
        return h
    return h + resize_to(ctrl.to(h.dtype), h.shape[-2:])


class Downsample:
    """forward_timestep_embed_patch for Downsample: stride 4 in the layout's block while the run says so."""

    def __init__(self, host: Host):
        self.host = host

    def __call__(self, layer, x, emb, context, transformer_options, output_shape, *args, **kwargs):
        run = _active(transformer_options)
        if (run is None or transformer_options.get("block") != ("input", run.layout.strided_block)
                or not run.strided(transformer_options["sigmas"]) or not getattr(layer, "use_conv", False)):
            return layer(x)
        weight, bias, offload = self.host.cast(layer.op, x)
        try:
            return strided_conv(x, weight, bias)
        finally:
            self.host.uncast(layer.op, weight, bias, offload)


def input_block(h, transformer_options):
    run = _active(transformer_options)
    if run is None:
        return h
    h = _add_control(h, transformer_options.get(CONTROL_KEY), "input")
    if transformer_options.get("block") == ("input", run.layout.pooled_block) and run.pooled(
            transformer_options["sigmas"]):
        h = pool(h)
    return h


def output_block(h, hsp, transformer_options):
    run = _active(transformer_options)
    if run is None:
        return h, hsp
    stash = transformer_options.get(CONTROL_KEY)
    block = transformer_options.get("block")
    if stash is not None and block == ("output", 0):
        h = _add_control(h, stash, "middle")
    hsp = _add_control(hsp, stash, "output")
    if block == ("output", run.layout.unpool_block) and run.pooled(transformer_options["sigmas"]):
        h = resize_to(h, hsp.shape[-2:])
    return h, hsp


class WindowAttention:
    """attn1 replacement on the layout's top self-attention layers: MSW-MSA during a run, plain otherwise."""

    def __init__(self, host: Host, block: tuple[str, int, int]):
        self.host, self.block = host, block

    def __call__(self, q, k, v, extra_options):
        heads, precision = extra_options["n_heads"], extra_options.get("attn_precision")
        run = _active(extra_options)
        shape = extra_options.get("activations_shape")
        if run is None or not run.windows or shape is None:
            return self.host.attention(q, k, v, heads, attn_precision=precision)
        height, width = int(shape[-2]), int(shape[-1])
        shift = run.shift(extra_options["sigmas"], height, width, layer_index(self.block))
        return windowed_attention(q, k, v, height, width, shift,
                             lambda a, b, c: self.host.attention(a, b, c, heads, attn_precision=precision))
