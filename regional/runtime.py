"""Regional prompting on a running model (plain torch; ComfyUI's attention is passed in).

- UNets: an ``attn2`` replacement on every cross-attention layer runs one attention per prompt on the positive
  rows (each region's prompt projected by the layer's own ``to_k`` / ``to_v``) and blends them by the region
  masks laid out on that layer's token grid (``attention.regional_attention``).
- Flux: a DIFFUSION_MODEL wrapper appends the region prompts to the positive rows' text and hands the forward a
  joint attention mask (``attention.joint_mask``), after Chen et al., "Training-free Regional Prompting for
  Diffusion Transformers", arXiv:2411.02395.
- SD3 (MMDiT) and Qwen-Image: the same text and mask (one builder, ``JointRegionText``: every such sequence is
  ``[text; image]``), the text appended to ``c_crossattn`` by an APPLY_MODEL wrapper and the mask handed to the
  joint attention calls through ``optimized_attention_override``.

All act only inside the run's window and leave the negative prompt's rows untouched.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable

import torch

from ..caching.store import TILES
from ..guidance.pag_runtime import rows_of
from ..utils.sigma_window import SigmaWindow
from .attention import (
    Region,
    RegionError,
    frame_masks,
    joint_mask,
    masks_on_grid,
    regional_attention,
)

log = logging.getLogger("preprint")
NEGATIVE = 1  # ComfyUI's index of the negative prompt in cond_or_uncond


def positive_rows(to: dict, batch: int) -> list[int]:
    cou = to.get("cond_or_uncond") or []
    return rows_of([j for j, c in enumerate(cou) if c != NEGATIVE], batch, len(cou))


def active(to: dict, window: SigmaWindow) -> bool:
    sigmas = to.get("sigmas")
    return sigmas is not None and float(sigmas.max()) in window


class RegionSet:
    """One node's regions, their masks on each token grid and their prompts on each device and dtype, made once
    and shared by every layer and step (neither changes while sampling)."""

    def __init__(self, regions: tuple[Region, ...]):
        self.regions = regions
        self._grids: dict = {}
        self._contexts: dict = {}

    def masks(self, batch: int, height: int, width: int, device) -> torch.Tensor:
        """``[N, batch, height * width]`` (see ``masks_on_grid``)."""
        key = (batch, height, width, device)
        if key not in self._grids:
            self._grids[key] = masks_on_grid([r.mask.to(device) for r in self.regions], batch, height, width)
        return self._grids[key]

    def contexts(self, device, dtype) -> list[torch.Tensor]:
        """Each region's prompt on ``device`` in ``dtype``, each in its own memory even where two regions were given
        one tensor (regional LoRA tells a region's prompt by its storage)."""
        key = (device, dtype)
        if key not in self._contexts:
            self._contexts[key] = [r.context.to(device=device, dtype=dtype, copy=True) for r in self.regions]
        return self._contexts[key]


class UNetRegionalAttention:
    """``attn2`` replacement for one cross-attention layer: per-prompt attention on the positive rows,
    blended by the masks on this layer's grid (under Tiled Diffusion, each tile's part of them)."""

    def __init__(self, attention: Callable, attn2, regions: RegionSet, base_ratio: float, window: SigmaWindow,
                 previous=None):
        self.attention, self.attn2, self.regions, self.base_ratio = attention, attn2, regions, base_ratio
        self.window, self.previous = window, previous

    def _attend(self, q, k, v, extra_options):
        if self.previous is not None:
            return self.previous(q, k, v, extra_options)
        return self.attention(q, k, v, extra_options["n_heads"], attn_precision=extra_options.get("attn_precision"),
                              transformer_options=extra_options)

    def __call__(self, q, k, v, extra_options):
        base = self._attend(q, k, v, extra_options)
        if not active(extra_options, self.window):
            return base
        rows = positive_rows(extra_options, q.shape[0])
        if not rows:
            return base
        h, w = (int(n) for n in extra_options["activations_shape"][-2:])
        idx = torch.tensor(rows, device=q.device)
        batch = q.shape[0]
        sel = torch.zeros(batch, 1, 1, dtype=torch.bool, device=q.device)
        sel[idx] = True
        outs = []
        for context in self.regions.contexts(q.device, q.dtype):
            # projected and attended at the batch's own shapes, so a region prompt equal to the base prompt
            # reproduces the base output bit for bit
            ctx = context.expand(batch, -1, -1)
            kr, vr = self.attn2.to_k(ctx), self.attn2.to_v(ctx)
            if kr.shape == k.shape:
                kr, vr = torch.where(sel, kr, k), torch.where(sel, vr, v)
                qr = q
            else:
                kr, vr, qr = kr[idx], vr[idx], q[idx]
            a = self.attention(qr, kr, vr, extra_options["n_heads"], attn_precision=extra_options.get("attn_precision"),
                               transformer_options=extra_options)
            outs.append(a[idx] if qr is q else a)
        per = q.shape[0] // len(extra_options["cond_or_uncond"])
        masks, which = frame_masks(self.regions.masks, per, h, w, q.device, rows, batch, extra_options.get(TILES))
        masks = masks[:, which]
        out = base.clone()
        out[idx] = regional_attention(base[idx], outs, masks, self.base_ratio)
        return out


class JointRegionText:
    """The region text and joint attention mask for a joint-attention DiT whose sequence is ``[text; image]`` (Flux
    and SD3 alike): the region prompts' tokens appended to each positive row's text (zeros, seen by nobody, on the
    other rows) and the ``attention.joint_mask`` of the regions on the image token grid. The same every step, so
    built once per batch layout."""

    def __init__(self, regions: RegionSet, base_ratio: float):
        self.regions, self.base_ratio = regions, base_ratio
        self._built: tuple[tuple, tuple[torch.Tensor, torch.Tensor]] | None = None  # last batch layout's text, mask

    def build(self, cou: tuple, batch: int, grid: tuple[int, int], n_ref: int, base_len: int, context: torch.Tensor,
              dtype, device, tiles: tuple | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The tokens appended to each row's text ``[batch, extra, D]`` (in ``context``'s dtype) and the joint
        attention mask ``[batch, L, L]`` for ``base_len`` text tokens before them (the base prompt, with any
        register tokens the model puts in front of it), the region text, the ``grid`` of image tokens and
        ``n_ref`` reference image tokens no region covers. ``tiles``: Tiled Diffusion's tiles of this call (see
        ``attention.frame_masks``); each tile's rows get the tile's part of the masks."""
        tile_key = None if tiles is None else (tuple(tiles[0]), tiles[1], tiles[2])
        key = (cou, batch, grid, n_ref, base_len, context.dtype, dtype, device, tile_key)
        if self._built is not None and self._built[0] == key:
            return self._built[1]
        contexts = self.regions.contexts(context.device, context.dtype)
        lengths = [base_len] + [int(c.shape[1]) for c in contexts]
        extra_len = sum(lengths[1:])
        rows = set(positive_rows({"cond_or_uncond": list(cou)}, batch))
        chunk = batch // len(cou or [1])
        per_image, images = frame_masks(self.regions.masks, chunk, *grid, device, list(range(batch)), batch, tiles)
        if n_ref:  # Kontext reference tokens: image no region covers
            per_image = torch.cat([per_image, per_image.new_zeros(*per_image.shape[:2], n_ref)], dim=2)
        regional = joint_mask(lengths, per_image, self.base_ratio, dtype=dtype).to(device)
        total = regional.shape[-1]
        region_text = torch.cat([c[0] for c in contexts])
        padding = torch.where(torch.eye(extra_len, dtype=torch.bool, device=device), 0.0, float("-inf")).to(dtype)
        pad = slice(lengths[0], lengths[0] + extra_len)
        mask = torch.zeros(batch, total, total, dtype=dtype, device=device)
        pieces = []
        for b in range(batch):
            if b in rows:
                pieces.append(region_text)
                mask[b] = regional[images[b]]
            else:  # other rows: the appended tokens are padding nobody sees
                pieces.append(torch.zeros_like(region_text))
                mask[b, :, pad] = float("-inf")
                mask[b, pad, pad] = padding
        self._built = (key, (torch.stack(pieces), mask))
        return self._built[1]


class FluxRegional:
    """DIFFUSION_MODEL wrapper for Flux: region text appended to the positive rows, joint attention mask.

    ``Flux.forward`` hands its wrappers ``_forward``'s arguments positionally: ``(x, timestep, context, y, guidance,
    ref_latents, control, transformer_options, **kwargs)`` on 0.3.64 and on the newest sources read (0.33), with
    ``attention_mask`` in ``kwargs``. They are bound by name against the wrapped function's signature all the same,
    so a reordered or extended signature still reaches the right tensors. On Flux.2 layouts (``txt_ids_dims`` in
    the config) each region's text is numbered from 0 along those axes for the call, as on Qwen-Image."""

    REQUIRED = ("x", "context", "transformer_options")

    def __init__(self, node: str, regions: RegionSet, base_ratio: float, window: SigmaWindow, family: str = "Flux"):
        self.node, self.regions, self.base_ratio, self.window = node, regions, base_ratio, window
        self.family, self.warned = family, False
        self.joint = JointRegionText(regions, base_ratio)
        self._signature: tuple[object, inspect.Signature, str | None] | None = None

    def _bind(self, executor, args, kwargs) -> tuple[inspect.BoundArguments, str | None]:
        fn = getattr(executor.original, "__func__", executor.original)
        if self._signature is None or self._signature[0] is not fn:  # once per wrapped function
            sig = inspect.signature(executor.original)
            varkw = next((p.name for p in sig.parameters.values() if p.kind is p.VAR_KEYWORD), None)
            missing = [n for n in self.REQUIRED if n not in sig.parameters]
            if varkw is None and "attention_mask" not in sig.parameters:
                missing.append("attention_mask")
            if missing:
                raise RegionError(f"{self.node}: this ComfyUI's {self.family} forward takes {sig}, without "
                                  f"{', '.join(missing)}; regional prompting cannot place its text. Update the "
                                  "Preprint pack.")
            self._signature = (fn, sig, varkw)
        _, sig, varkw = self._signature
        return sig.bind(*args, **kwargs), varkw

    def __call__(self, executor, *args, **kwargs):
        bound, varkw = self._bind(executor, args, kwargs)
        a = bound.arguments
        to = a.get("transformer_options") or {}
        if not active(to, self.window) or not positive_rows(to, a["x"].shape[0]):  # a negative-only call: as it was
            return executor(*args, **kwargs)
        extra = dict(a.get(varkw) or {}) if varkw else {}
        if a.get("attention_mask", extra.get("attention_mask")) is not None:
            raise RegionError(f"{self.node}: the conditioning already carries a {self.family} attention mask; regional "
                              "prompting builds its own. Remove the other mask (or this node).")
        x, context, ref_latents = a["x"], a["context"], a.get("ref_latents")
        patch = int(getattr(executor.class_obj, "patch_size", 2))  # 2 on Flux.1; newer Flux.2 layouts use 1
        grid = (-(-x.shape[-2] // patch), -(-x.shape[-1] // patch))
        n_ref = reference_tokens(ref_latents, patch)
        text, mask = self.joint.build(tuple(to.get("cond_or_uncond") or ()), x.shape[0], grid, n_ref,
                                      int(context.shape[1]), context, x.dtype, x.device, to.get(TILES))
        a["context"] = torch.cat([context, text], dim=1)
        if "attention_mask" in bound.signature.parameters:
            a["attention_mask"] = mask
        else:
            a[varkw] = {**extra, "attention_mask": mask}
        # Text positions: zeros on Flux.1 in every release. Where the config names txt_ids_dims (Flux.2 layouts),
        # _forward numbers the text 0..L-1 along those axes, which would put each region's prompt after the base
        # prompt's; for the call, a pre-hook on the position embedder numbers each region's text from 0 again.
        axes = list(getattr(getattr(executor.class_obj, "params", None), "txt_ids_dims", None) or [])
        if not axes:
            return executor(*bound.args, **bound.kwargs)
        fired: list = []
        spans = region_spans(self.regions, int(context.shape[1]))
        handle = restart_region_positions(executor.class_obj.pe_embedder, spans, mask.shape[-1], axes, fired)
        try:
            out = executor(*bound.args, **bound.kwargs)
        finally:
            handle.remove()
        if not fired and not self.warned:
            self.warned = True
            warn_positions_kept(self.node)
        return out


def region_spans(regions: RegionSet, base_len: int) -> list[tuple[int, int]]:
    """Token spans ``[start, end)`` of each region's text appended after ``base_len`` text tokens."""
    spans, at = [], base_len
    for r in regions.regions:
        spans.append((at, at + int(r.context.shape[1])))
        at += int(r.context.shape[1])
    return spans


def restart_region_positions(embedder: torch.nn.Module, spans: list[tuple[int, int]], total: int,
                             axes: list[int] | None, fired: list):
    """Forward pre-hook on a DiT's position embedder (input: ids ``[B, L, axes]`` over the joint sequence) that numbers
    each region's text span from the first text token's position again, as that prompt alone would be numbered:
    on every axis (``axes`` None: Qwen-Image counts text on all of them) or only on the listed ones (Flux.2's
    ``txt_ids_dims``). Ids of another length (a call this region set was not built for) pass unchanged. Appends to
    ``fired`` when it renumbers; returns the hook handle (remove it after the call)."""
    cols = slice(None) if axes is None else list(axes)

    def hook(_module, args):
        ids = args[0]
        if ids.ndim != 3 or ids.shape[1] != total:
            return None
        fired.append(True)
        ids = ids.clone()
        for a, b in spans:
            step = torch.arange(b - a, device=ids.device, dtype=ids.dtype).view(1, -1, 1)
            ids[:, a:b, cols] = ids[:, :1, cols] + step
        return (ids, *args[1:])
    return embedder.register_forward_pre_hook(hook)


def warn_positions_kept(node: str) -> None:
    log.warning("%s: the model's position embedder was not called through its module (a compiled model?); the "
                "region prompts keep the positions after the base prompt", node)


class JointMaskOverride:
    """``optimized_attention_override`` handing the joint attention mask to the attention calls over the whole
    ``[text; image]`` sequence (recognised by their length) and nothing else: SD3's image-only self-attention
    (MMDiT-X blocks) runs as it was. The mask may come as a keyword or as the fifth positional argument (Qwen-Image
    passes its ``None`` mask positionally). Chains an earlier override; a call that already carries a mask keeps it.
    ``calls`` / ``hits`` count the attention calls seen and those given the mask."""

    def __init__(self, mask: torch.Tensor, total: int, previous=None):
        self.mask, self.total, self.previous = mask, total, previous
        self.calls = self.hits = 0
        self.lengths: set[int] = set()

    def __call__(self, func, *args, **kwargs):
        q = args[0] if args else kwargs.get("q")
        token_dim = 2 if kwargs.get("skip_reshape", False) else 1
        self.calls += 1
        if q is not None:
            self.lengths.add(int(q.shape[token_dim]))
        own = args[4] if len(args) > 4 else kwargs.get("mask")
        if q is not None and q.shape[token_dim] == self.total and own is None:
            mask = self.mask.to(dtype=q.dtype) if self.mask.dtype != q.dtype else self.mask
            if len(args) > 4:
                args = (*args[:4], mask, *args[5:])
            else:
                kwargs = {**kwargs, "mask": mask}
            self.hits += 1
        if self.previous is not None:
            return self.previous(func, *args, **kwargs)
        return func(*args, **kwargs)


def reference_tokens(ref_latents, patch: int) -> int:
    """Image tokens the reference latents (Kontext / Qwen-Image-Edit) add after the latent's own grid."""
    return sum(-(-r.shape[-2] // patch) * -(-r.shape[-1] // patch) for r in (ref_latents or []))


class JointRegional:
    """APPLY_MODEL wrapper for joint-attention DiTs that take no attention mask of their own: SD3 (MMDiT) and
    Qwen-Image. The region text is appended to the positive rows' ``c_crossattn`` and the joint attention mask
    handed to every joint block's attention through ``optimized_attention_override``.

    ComfyUI 0.3.64's MMDiT runs no DIFFUSION_MODEL wrappers and takes no attention mask, and Qwen-Image's blocks
    never pass a mask to their attention (in 0.3.64 and the newest sources read), but every joint block calls
    ``optimized_attention`` with the call's ``transformer_options``, whose override sees the joint ``[context; x]``
    query. SD3's last block's text is ``context_pre_only``: its text queries are computed and dropped, the mask is
    the same. ``patch`` (the patch size) and ``lead`` (register tokens in front of the text) come from the model;
    reference latents count as image no region covers. A call whose attention ran but never met the joint
    sequence's length (another patch changed the sequence) is an error, never a silent plain run.

    ``restart_text_positions`` (Qwen-Image): the model numbers its text tokens ``start + j`` on every rotary axis, so
    appended region text would sit after the base prompt; for the duration of the call a pre-hook on the model's
    ``pe_embedder`` numbers each region's text from ``start`` again, as that prompt alone would be."""

    def __init__(self, node: str, regions: RegionSet, base_ratio: float, window: SigmaWindow, patch: int, lead: int,
                 restart_text_positions: bool = False):
        self.joint = JointRegionText(regions, base_ratio)
        self.node, self.window, self.patch, self.lead = node, window, patch, lead
        self.restart, self.warned = restart_text_positions, False

    def __call__(self, executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options=None,
                 **kwargs):
        to = transformer_options or {}
        if c_crossattn is None or not active(to, self.window) or not positive_rows(to, x.shape[0]):
            return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
        model = executor.class_obj
        dtype = model.manual_cast_dtype if getattr(model, "manual_cast_dtype", None) is not None else model.get_dtype()
        grid = (-(-x.shape[-2] // self.patch), -(-x.shape[-1] // self.patch))
        base_len = self.lead + int(c_crossattn.shape[1])
        text, mask = self.joint.build(tuple(to.get("cond_or_uncond") or ()), x.shape[0], grid,
                                      reference_tokens(kwargs.get("ref_latents"), self.patch), base_len,
                                      c_crossattn, dtype, x.device)
        override = JointMaskOverride(mask, mask.shape[-1], to.get("optimized_attention_override"))
        context = torch.cat([c_crossattn, text], dim=1)
        fired: list = []
        handle = None
        if self.restart:
            handle = restart_region_positions(model.diffusion_model.pe_embedder,
                                              region_spans(self.joint.regions, base_len), mask.shape[-1], None, fired)
        try:
            out = executor(x, t, c_concat, context, control, {**to, "optimized_attention_override": override},
                           **kwargs)
        finally:
            if handle is not None:
                handle.remove()
        if (override.calls or fired) and not override.hits:  # the model ran, and the region text went unmasked
            seen = sorted(override.lengths) if override.lengths else "none through ComfyUI's attention override"
            raise RegionError(f"{self.node}: the model's attention never took the regional mask: it was built for "
                              f"a sequence of {mask.shape[-1]} tokens (text, region text, image), and the attention "
                              f"calls saw {seen}. Another patch changes the sequence or replaces the attention "
                              "function; remove it from this model, or use core's ConditioningSetMask.")
        if self.restart and override.hits and not fired and not self.warned:
            self.warned = True
            warn_positions_kept(self.node)
        return out
