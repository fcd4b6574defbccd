"""A UNet forward pass that can skip or reuse whole blocks, built from the model's own blocks.

It follows ComfyUI's ``UNetModel._forward`` step for step (time embedding, ``emb_patch``, label embedding,
input / middle / output blocks with ``input_block_patch``, ``input_block_patch_after_skip``,
``middle_block_after_patch``, ``output_block_patch`` (which may return ``hsp=None``: the block then gets ``h``
alone), ControlNet residuals, ``transformer_options["block"]`` and ``"transformer_index"``) and runs every block
through the block's own ``forward`` (``forward_timestep_embed``), so attention patches, LoRA-patched weights and
other per-block hooks behave as in the stock forward. With every block run it computes the same numbers, bit for
bit. The middle-block hook and ``hsp=None`` come from newer ComfyUI; they are implemented as its forward does them
whichever version runs, since a patch that sets them expects that behaviour.

A patch this forward does not know would be dropped silently if the forward replaced the stock one; callers
check :func:`unhandled_patches` first and hand such calls to the stock forward.

A *plan* decides, block by block and in execution order, one of three actions:

- ``RUN``: compute the block (the plan may record its output);
- ``REUSE``: take the block's output from the plan's cache instead of computing it; ControlNet residuals and
  block patches after the block still apply, so a fresh control signal reaches a reused feature;
- ``SKIP``: the block's output is not needed (DeepCache skips the whole deep branch); its ControlNet
  residual is still popped so the following blocks receive theirs in order.

The module imports nothing from ComfyUI: the timestep embedding function is passed in.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch

RUN, REUSE, SKIP = "run", "reuse", "skip"
BlockName = tuple[str, int]

_TRANSFORMER_CLASSES = ("SpatialTransformer", "SpatialVideoTransformer")

# transformer_options["patches"] keys, by who runs them. A key outside these sets may be read by a newer stock
# forward than the one copied here, so a call that carries one must not go through run_unet.
FORWARD_PATCHES = frozenset({"emb_patch", "input_block_patch", "input_block_patch_after_skip",
                             "middle_block_after_patch", "output_block_patch"})
# read inside the blocks (forward_timestep_embed, BasicTransformerBlock), which run_unet calls as they are
BLOCK_PATCHES = frozenset({"forward_timestep_embed_patch", "attn1_patch", "attn1_output_patch", "middle_patch",
                           "attn2_patch", "attn2_output_patch"})
# read only by transformer (DiT) forwards, never by a UNet: the stock UNet forward ignores them as well
OTHER_MODEL_PATCHES = frozenset({"double_block", "post_input", "noise_refiner"})
KNOWN_PATCHES = FORWARD_PATCHES | BLOCK_PATCHES | OTHER_MODEL_PATCHES
# patches_replace: attention replacements inside the blocks; "dit" belongs to transformer models
KNOWN_REPLACES = frozenset({"attn1", "attn2", "dit"})


def unhandled_patches(transformer_options: dict | None) -> list[str]:
    """Names of the patches in ``transformer_options`` that :func:`run_unet` would not run (empty lists aside),
    as ``patches[KEY]`` / ``patches_replace[KEY]``."""
    to = transformer_options or {}
    out = [f"patches[{k!r}]" for k, v in (to.get("patches") or {}).items() if v and k not in KNOWN_PATCHES]
    out += [f"patches_replace[{k!r}]" for k, v in (to.get("patches_replace") or {}).items()
            if v and k not in KNOWN_REPLACES]
    return sorted(out)


class UNetPlan(Protocol):
    def action(self, name: BlockName) -> str: ...

    def cached(self, name: BlockName) -> torch.Tensor: ...

    def computed(self, name: BlockName, out: torch.Tensor) -> None: ...


@dataclass
class BlockCounts:
    """Per-block tallies over a run: how often each block ran, was reused or skipped."""

    run: dict[BlockName, int] = field(default_factory=dict)
    not_run: dict[BlockName, int] = field(default_factory=dict)
    # newer ComfyUI can run the cond chunks of one step on several devices at once, one thread each
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, name: BlockName, ran: bool) -> None:
        with self._lock:
            d = self.run if ran else self.not_run
            d[name] = d.get(name, 0) + 1

    def skipped_fraction(self, cost: dict[BlockName, float] | None = None) -> float:
        """Fraction of block compute not run, weighted by ``cost`` per block (uniform when None)."""
        names = set(self.run) | set(self.not_run)
        w = (lambda n: cost.get(n, 0.0)) if cost else (lambda n: 1.0)
        total = sum(w(n) * (self.run.get(n, 0) + self.not_run.get(n, 0)) for n in names)
        return sum(w(n) * self.not_run.get(n, 0) for n in names) / total if total else 0.0


def block_names(unet: torch.nn.Module) -> list[BlockName]:
    names = [("input", i) for i in range(len(unet.input_blocks))]
    if getattr(unet, "middle_block", None) is not None:
        names.append(("middle", 0))
    names += [("output", i) for i in range(len(unet.output_blocks))]
    return names


def _transformers_in(module: torch.nn.Module) -> int:
    layers = module.children()  # TimestepEmbedSequential: its layers; a plain block: its submodules
    return sum(1 for layer in layers if type(layer).__name__ in _TRANSFORMER_CLASSES)


def _take_control(control: dict | None, name: str) -> torch.Tensor | None:
    # ComfyUI's apply_control pops one residual per block from the end of the list; do the same, always.
    if control is not None and name in control and len(control[name]) > 0:
        return control[name].pop()
    return None


def _add_control(h: torch.Tensor, ctrl: torch.Tensor | None) -> torch.Tensor:
    if ctrl is None:
        return h
    try:
        fits = torch.broadcast_shapes(h.shape, ctrl.shape) == h.shape
    except RuntimeError:
        fits = False
    if not fits:
        return h  # stock forward logs a warning and leaves h unchanged
    # out of place: h may be a cached tensor (same values as the stock in-place add, which keeps h's dtype: a
    # T2I-Adapter's float32 residual must not turn a half-precision UNet's activations into float32)
    return h + ctrl.to(h.dtype)


def run_unet(unet: torch.nn.Module, plan: UNetPlan, timestep_embedding: Callable, x: torch.Tensor,
             timesteps: torch.Tensor | None = None, context: torch.Tensor | None = None,
             y: torch.Tensor | None = None, control: dict | None = None, transformer_options: dict | None = None,
             counts: BlockCounts | None = None, **kwargs) -> torch.Tensor:
    to = {} if transformer_options is None else transformer_options
    to["original_shape"] = list(x.shape)
    to["transformer_index"] = 0
    patches = to.get("patches", {})

    num_video_frames = kwargs.get("num_video_frames", getattr(unet, "default_num_video_frames", None))
    extra = {"time_context": kwargs.get("time_context"), "num_video_frames": num_video_frames,
             "image_only_indicator": kwargs.get("image_only_indicator")}

    if (y is not None) != (unet.num_classes is not None):
        raise ValueError("must specify y if and only if the model is class-conditional")
    t_emb = timestep_embedding(timesteps, unet.model_channels, repeat_only=False).to(x.dtype)
    emb = unet.time_embed(t_emb)
    for p in patches.get("emb_patch", []):
        emb = p(emb, unet.model_channels, to)
    if unet.num_classes is not None:
        emb = emb + unet.label_emb(y)

    def compute(name: BlockName, module: torch.nn.Module, h: torch.Tensor | None, *args) -> torch.Tensor:
        if h is None:
            raise RuntimeError(f"cache plan runs block {name} but skipped a block it depends on")
        out = module(h, emb, context, to, *args, **extra)
        plan.computed(name, out)
        if counts is not None:
            counts.add(name, True)
        return out

    def bypass(name: BlockName, module: torch.nn.Module, act: str) -> torch.Tensor | None:
        """The cached output of a reused block, None for a skipped one."""
        out = plan.cached(name) if act == REUSE else None
        # attention patches read the index of the transformer they run in: count the ones not run, as the
        # stock forward would have
        to["transformer_index"] += _transformers_in(module)
        if counts is not None:
            counts.add(name, False)
        return out

    hs: list[torch.Tensor | None] = []
    h: torch.Tensor | None = x
    for i, module in enumerate(unet.input_blocks):
        name = ("input", i)
        to["block"] = name
        act = plan.action(name)
        h = compute(name, module, h) if act == RUN else bypass(name, module, act)
        ctrl = _take_control(control, "input")
        if h is None:
            hs.append(None)
            continue
        h = _add_control(h, ctrl)
        for p in patches.get("input_block_patch", []):
            h = p(h, to)
        hs.append(h)
        for p in patches.get("input_block_patch_after_skip", []):
            h = p(h, to)

    to["block"] = ("middle", 0)
    if unet.middle_block is not None:
        name = ("middle", 0)
        act = plan.action(name)
        h = compute(name, unet.middle_block, h) if act == RUN else bypass(name, unet.middle_block, act)
    ctrl = _take_control(control, "middle")
    if h is not None:  # a skipped middle block's output is not needed, nor the hooks on it
        h = _add_control(h, ctrl)
        for p in patches.get("middle_block_after_patch", []):
            h = p({"h": h, "x": x, "emb": emb, "context": context, "y": y, "timesteps": timesteps,
                   "transformer_options": to})["h"]

    for j, module in enumerate(unet.output_blocks):
        name = ("output", j)
        to["block"] = name
        # the skip feature and the ControlNet residual are taken on every path, so later blocks get their own
        hsp = hs.pop()
        ctrl = _take_control(control, "output")
        act = plan.action(name)
        if act != RUN:
            # a reused block's output replaces h; its skip input is not needed (patches on it would be lost)
            h = bypass(name, module, act)
            continue
        if h is None or hsp is None:
            raise RuntimeError(f"cache plan runs block {name} but skipped a block it depends on")
        # the next skip feature sets this block's output size (its up-sampler targets that shape)
        if hs and hs[-1] is None:
            raise RuntimeError(f"cache plan runs block {name} but skipped the input block feeding the next one")
        output_shape = hs[-1].shape if hs else None
        hsp = _add_control(hsp, ctrl)
        for p in patches.get("output_block_patch", []):
            h, hsp = p(h, hsp, to)
        if hsp is not None:  # a patch that merged the skip feature into h itself returns None
            h = torch.cat([h, hsp], dim=1)
        del hsp
        h = compute(name, module, h, output_shape)
    if h is None:
        raise RuntimeError("cache plan skipped the last output block")
    h = h.type(x.dtype)
    if unet.predict_codebook_ids:
        return unet.id_predictor(h)
    return unet.out(h)


class RunAll:
    """The trivial plan: every block runs; optionally records the outputs of ``record`` blocks."""

    def __init__(self, record: set[BlockName] | None = None):
        self.record = record or set()
        self.outputs: dict[BlockName, torch.Tensor] = {}

    def action(self, name: BlockName) -> str:
        return RUN

    def cached(self, name: BlockName) -> torch.Tensor:
        raise KeyError(name)

    def computed(self, name: BlockName, out: torch.Tensor) -> None:
        if name in self.record:
            self.outputs[name] = out
