"""Regional LoRA inside the one regional pass (plain torch; ComfyUI's patch maths is handed in).

A region whose prompt carries LoRA weight hooks gets that LoRA only on its own tokens. For every Linear / Conv layer
the LoRA touches, the layer's output becomes

    out = W x + b + sum_r m_r ⊙ (ΔW_r x + Δb_r)

with ``ΔW_r`` the weight change the hook's patches make (computed by ComfyUI's own ``calculate_weight`` at the
hook's strength times its keyframe strength, once per run and strength, never written into the shared weights) and
``m_r`` region r's weight on each output token of that layer:

- image tokens (UNet convolutions and token layers, DiT image stream, Flux ``img_in`` / ``final_layer``): the
  region's mask resampled by area averaging to the layer's token grid (``attention.masks_on_grid``); on Flux,
  Kontext reference tokens get 0;
- text tokens (DiT text stream): 1 on the region's own prompt tokens (appended after the base prompt by regional
  prompting), 0 on the base prompt and the other regions' text; on a UNet the region's prompt is projected by the
  cross-attention ``to_k`` / ``to_v`` apart from the base prompt, so those projections of the region's prompt get
  the whole delta and the base prompt's none;
- joint ``[text; image]`` tokens (Flux single blocks): both rules side by side;
- layers that see no tokens (time, pooled-text and guidance embeddings, AdaLN modulation) act on the whole image
  at once, so the delta is weighted by the region's area share (the mean of its mask): a region over the whole
  frame gets all of it, an empty one none;
- the negative prompt's rows: 0 everywhere (its prompt carries no region).

Overlapping regions with LoRAs add their deltas (as two LoRAs loaded together do). Where every weight of a call
is 0 (strength 0, empty mask, outside the regional window) the layers run untouched, bitwise.

Keyframes follow ComfyUI's ``HookKeyframeGroup.prepare_current_keyframe``: the keyframe whose start (a sigma) has
been reached is current, held for at least its ``guarantee_steps`` distinct model-call sigmas.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .attention import Region, RegionError

IMAGE, TEXT, JOINT, VECTOR, CONTEXT = "image", "text", "joint", "vector", "context"


@dataclass(frozen=True)
class LoraRegion(Region):
    """A region whose prompt carries hooks (``hooks``: the host's hook group, opaque here)."""

    hooks: object = None


@dataclass(frozen=True)
class Keyframe:
    strength: float
    start_sigma: float
    guarantee_steps: int = 1


class KeyframeClock:
    """The current keyframe strength of one hook over a run, as ComfyUI's hook keyframes step (one per run)."""

    def __init__(self, keyframes: tuple[Keyframe, ...]):
        self.keyframes = keyframes
        self.index, self.used, self.last = 0, 0, None

    def _guarantee(self, kf: Keyframe, max_sigma: float) -> int:
        return 0 if kf.start_sigma > max_sigma else kf.guarantee_steps  # started before this run's range: none

    def strength(self, sigma: float, max_sigma: float) -> float:
        if not self.keyframes:
            return 1.0
        if sigma == self.last:
            return self.keyframes[self.index].strength
        if self.used >= self._guarantee(self.keyframes[self.index], max_sigma):
            for i in range(self.index + 1, len(self.keyframes)):
                kf = self.keyframes[i]
                if kf.start_sigma < sigma:  # starts later in the run
                    break
                self.index, self.used = i, 0
                if self._guarantee(kf, max_sigma) > 0:
                    break
        self.used += 1
        self.last = sigma
        return self.keyframes[self.index].strength


@dataclass(frozen=True)
class HookSchedule:
    """One weight hook of a region: its model strength and keyframes."""

    strength: float
    keyframes: tuple[Keyframe, ...] = ()


# (module path, parameter "weight" / "bias", the parameter, per-hook strengths) -> the parameter's change (float32)
DeltaFn = Callable[[str, str, torch.Tensor, tuple[float, ...]], torch.Tensor]


@dataclass
class RegionLoraSpec:
    """Region ``index``'s LoRA: its hooks and, per affected module path (relative to the diffusion model), the
    parameters the hooks patch; ``delta`` computes a parameter's change at given hook strengths."""

    index: int
    hooks: tuple[HookSchedule, ...]
    params: dict[str, tuple[str, ...]]
    delta: DeltaFn


FLUX_VECTOR = ("_mod.lin", "modulation.lin")
FLUX_EMBEDDERS = ("time_in.", "vector_in.", "guidance_in.")


def layer_stream(family: str, path: str, ndim: int) -> str:
    """Which tokens a layer's output rows are (see the module docstring). ``ndim`` is the output's."""
    if ndim == 2:
        return VECTOR
    if family == "unet":
        if ndim == 3 and (".attn2.to_k" in path or ".attn2.to_v" in path):
            return CONTEXT
        return IMAGE
    if family == "flux":
        if path.endswith(FLUX_VECTOR) or ".adaLN_modulation." in path or path.startswith(FLUX_EMBEDDERS):
            return VECTOR  # modulation vectors come as [batch, 1, width] too
        if path.startswith("single_blocks."):
            return JOINT
        if path.startswith("txt_in") or ".txt_attn." in path or ".txt_mlp." in path:
            return TEXT
        return IMAGE
    raise RegionError(f"regional LoRA has no token rules for a {family} model.")


def unet_grids(height: int, width: int, levels: int = 8) -> dict[int, tuple[int, int]]:
    """Token count -> grid of a UNet's levels (every stride-2 step rounds up)."""
    grids, h, w = {}, height, width
    for _ in range(levels):
        grids.setdefault(h * w, (h, w))
        h, w = -(-h // 2), -(-w // 2)
    return grids


@dataclass
class CallLayout:
    """What one model call looks like: rows, the latent grid, the text spans; weights per region, made on demand."""

    family: str
    masks: Callable  # (per, h, w, device) -> [N, per, h * w], every region's mask on a grid
    batch: int
    per: int  # images per chunk
    positive: torch.Tensor  # [batch] 1.0 on rows of a prompt that carries regions, else 0.0
    latent: tuple[int, int]
    token_grid: tuple[int, int] | None  # DiT: the image token grid
    text_spans: dict[int, tuple[int, int]]  # DiT: region index -> its text tokens' span
    text_len: int
    region_context: Callable | None  # UNet: (region, device, dtype) -> its prompt as the cross-attention sees it
    cache: dict = field(default_factory=dict)

    def _rows(self, per_image: torch.Tensor) -> torch.Tensor:
        """``[per, ...]`` per image -> ``[batch, ...]`` per row, zero on rows without regions."""
        idx = torch.arange(self.batch, device=per_image.device) % self.per
        pos = self.positive.to(per_image.device, per_image.dtype).view(-1, *([1] * (per_image.ndim - 1)))
        return per_image[idx] * pos

    def _grid(self, region: int, h: int, w: int, device) -> torch.Tensor:
        key = ("grid", region, h, w, device)
        if key not in self.cache:
            self.cache[key] = self._rows(self.masks(self.per, h, w, device)[region])  # [batch, h * w]
        return self.cache[key]

    def _image_tokens(self, region: int, n: int, device) -> torch.Tensor:
        if self.family == "unet":
            grid = unet_grids(*self.latent).get(n)
            if grid is None:
                raise RegionError(f"a layer has {n} image tokens, which is no grid of a {self.latent[0]} x "
                                  f"{self.latent[1]} latent; regional LoRA cannot place its region there.")
            return self._grid(region, *grid, device)
        gh, gw = self.token_grid
        m = self._grid(region, gh, gw, device)
        if n < gh * gw:
            raise RegionError(f"a layer has {n} image tokens, fewer than the {gh} x {gw} grid.")
        return F.pad(m, (0, n - gh * gw))  # reference-image tokens: no region

    def _text_tokens(self, region: int, n: int, device) -> torch.Tensor:
        if n != self.text_len:
            raise RegionError(f"a text layer has {n} tokens where regional prompting laid out {self.text_len}; "
                              "another patch changed the text, and the region's LoRA cannot find its prompt.")
        s0, s1 = self.text_spans[region]
        m = torch.zeros(self.batch, n, device=device)
        m[:, s0:s1] = 1.0
        return m * self.positive.to(device).unsqueeze(1)

    def weights(self, region: int, stream: str, out: torch.Tensor) -> torch.Tensor:
        """Region ``region``'s weight on each row and token of a layer output ``out``, shaped to broadcast."""
        key = (region, stream, tuple(out.shape), out.device, out.dtype)
        if key in self.cache:
            return self.cache[key]
        if stream == VECTOR:
            share = self._grid(region, *self.latent, out.device).mean(dim=1)  # the region's area share per row
            w = share.view(-1, *([1] * (out.ndim - 1)))
        elif out.ndim == 4:  # convolution: the mask on the output's own grid
            h, w_ = out.shape[-2:]
            w = self._grid(region, h, w_, out.device).view(self.batch, 1, h, w_)
        elif stream == IMAGE:
            w = self._image_tokens(region, out.shape[1], out.device).unsqueeze(-1)
        elif stream == TEXT:
            w = self._text_tokens(region, out.shape[1], out.device).unsqueeze(-1)
        elif stream == JOINT:
            n_img = out.shape[1] - self.text_len
            w = torch.cat([self._text_tokens(region, self.text_len, out.device),
                           self._image_tokens(region, n_img, out.device)], dim=1).unsqueeze(-1)
        else:
            raise RegionError(f"no token rule for a {stream} layer output of shape {list(out.shape)}.")
        self.cache[key] = w.to(out.dtype)
        return self.cache[key]


class RegionalLoraRun:
    """Per sampling run: each hook's keyframe clock and the parameter changes computed so far."""

    def __init__(self, specs: tuple[RegionLoraSpec, ...]):
        self.specs = specs
        self.clocks = [[KeyframeClock(h.keyframes) for h in s.hooks] for s in specs]
        self._deltas: dict = {}

    def strengths(self, sigma: float, max_sigma: float) -> list[tuple[float, ...]]:
        """Every region's per-hook strengths at this model call (hook strength times keyframe strength)."""
        return [tuple(h.strength * c.strength(sigma, max_sigma) for h, c in zip(s.hooks, clocks, strict=True))
                for s, clocks in zip(self.specs, self.clocks, strict=True)]

    def delta(self, spec: RegionLoraSpec, path: str, param: str, tensor: torch.Tensor, strengths: tuple,
              like: torch.Tensor) -> torch.Tensor:
        key = (spec.index, path, param, strengths, like.device, like.dtype)
        if key not in self._deltas:
            d = spec.delta(path, param, tensor, strengths)
            self._deltas[key] = d.to(device=like.device, dtype=like.dtype)
        return self._deltas[key]


def layer_delta(module: torch.nn.Module, x: torch.Tensor, dw: torch.Tensor | None,
                db: torch.Tensor | None) -> torch.Tensor:
    """``ΔW x + Δb`` through the layer's own operation (Linear, or the convolution with its stride and padding);
    a bias-only change is returned shaped to broadcast over the output."""
    conv = isinstance(module, torch.nn.modules.conv._ConvNd)
    if not conv and not isinstance(module, torch.nn.Linear):
        raise RegionError(f"regional LoRA acts on Linear and Conv layers, not {type(module).__name__}.")
    if dw is None:
        return db.view(1, -1, *([1] * (x.ndim - 2))) if conv else db
    return module._conv_forward(x, dw, db) if conv else F.linear(x, dw, db)


class MaskedDelta:
    """Forward hook adding every active region's masked delta to one layer's output."""

    def __init__(self, path: str, run: RegionalLoraRun, layout: CallLayout,
                 active: list[tuple[RegionLoraSpec, tuple[float, ...]]]):
        self.path, self.run, self.layout, self.active = path, run, layout, active

    def __call__(self, module, args, out):
        x = args[0]
        stream = layer_stream(self.layout.family, self.path, out.ndim)
        for spec, strengths in self.active:
            params = spec.params.get(self.path)
            if not params:
                continue
            if stream == CONTEXT:  # a UNet cross-attention key / value: only the region's own prompt
                ctx = self.layout.region_context(spec.index, x.device, x.dtype)
                if x.data_ptr() != ctx.data_ptr() or x.shape[-2:] != ctx.shape[-2:]:
                    continue
                w = None
            else:
                w = self.layout.weights(spec.index, stream, out)
                if not bool(w.any()):
                    continue
            dw = self.run.delta(spec, self.path, "weight", module.weight, strengths, x) if "weight" in params else None
            db = self.run.delta(spec, self.path, "bias", module.bias, strengths, x) if "bias" in params else None
            d = layer_delta(module, x, dw, db)
            out = out + d if w is None else out + w * d
        return out


def active_regions(run: RegionalLoraRun, sigma: float, max_sigma: float) -> list[tuple[RegionLoraSpec, tuple]]:
    """The regions whose LoRA acts at this call: at least one hook with a strength other than 0."""
    return [(s, st) for s, st in zip(run.specs, run.strengths(sigma, max_sigma), strict=True) if any(st)]


def attach(modules: dict[str, torch.nn.Module], hook: Callable[[str], Callable]) -> list:
    """Register a forward hook on every module (``hook(path)`` makes it); returns the handles to remove."""
    return [m.register_forward_hook(hook(p)) for p, m in modules.items()]


class RegionalLoraApply:
    """APPLY_MODEL wrapper: while a call runs inside the regional window, every module a region's LoRA touches
    carries a forward hook adding the masked deltas; the hooks are removed when the call returns.

    ``run_key``: where the run's :class:`RegionalLoraRun` sits in ``transformer_options`` (an OUTER_SAMPLE wrapper
    puts a fresh one there each run). ``text_lead``: tokens a DiT puts before the base prompt."""

    def __init__(self, family: str, run_key: str, specs: tuple[RegionLoraSpec, ...], modules: dict,
                 regions, window, patch: int = 1, text_lead: int = 0):
        self.family, self.run_key, self.specs, self.modules = family, run_key, specs, modules
        self.regions, self.window, self.patch, self.text_lead = regions, window, patch, text_lead

    def layout(self, x, c_crossattn, to: dict, device) -> CallLayout:
        from .runtime import positive_rows

        batch = x.shape[0]
        cou = to.get("cond_or_uncond") or [0]
        positive = torch.zeros(batch)
        positive[positive_rows(to, batch)] = 1.0
        latent = (int(x.shape[-2]), int(x.shape[-1]))
        spans, text_len, grid, context = {}, 0, None, None
        if self.family == "unet":
            # regional attention projects each region's prompt as cached for the query's device and dtype
            def context(i, dev, dtype):
                return self.regions.contexts(dev, dtype)[i]
        else:
            grid = (-(-latent[0] // self.patch), -(-latent[1] // self.patch))
            start = int(c_crossattn.shape[1]) + self.text_lead
            for i, r in enumerate(self.regions.regions):
                spans[i] = (start, start + int(r.context.shape[1]))
                start = spans[i][1]
            text_len = start
        return CallLayout(self.family, self.regions.masks, batch, batch // len(cou), positive, latent, grid, spans,
                          text_len, context)

    def __call__(self, executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options=None,
                 **kwargs):
        from .runtime import active

        to = transformer_options or {}
        if not active(to, self.window):
            return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
        run = to.get(self.run_key)
        if run is None:  # a model call outside a sampling run: keyframes start from the first
            run = RegionalLoraRun(self.specs)
        sample = to.get("sample_sigmas")
        sigma = float(to["sigmas"].flatten()[0])
        max_sigma = float(sample.max()) if sample is not None else sigma
        regs = active_regions(run, sigma, max_sigma)
        if not regs or not positive_rows_any(to):
            return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
        layout = self.layout(x, c_crossattn, to, x.device)
        wanted = {p for s, _ in regs for p in s.params}
        handles = attach({p: m for p, m in self.modules.items() if p in wanted},
                         lambda p: MaskedDelta(p, run, layout, regs))
        try:
            return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
        finally:
            for h in handles:
                h.remove()


def positive_rows_any(to: dict) -> bool:
    return any(c != 1 for c in (to.get("cond_or_uncond") or [0]))
