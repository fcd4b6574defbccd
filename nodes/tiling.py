"""Tiled Diffusion for any size and any image model: every model evaluation is done tile by tile.

- Shifted tiles: Zheng et al., "Any-Size-Diffusion: Toward Efficient Text-Driven Synthesis for Any-Size HD Images"
  (Fast Seamless Tiled Diffusion), arXiv:2308.16582; Frolov et al., "SpotDiffusion: A Fast Approach For Seamless
  Panorama Generation Over Time", arXiv:2407.15507.
- Overlapping tiles: Bar-Tal et al., "MultiDiffusion: Fusing Diffusion Paths for Controlled Image Generation",
  arXiv:2302.08113; Gaussian tile weights from Jiménez, "Mixture of Diffusers for scene composition and high
  resolution image generation", arXiv:2302.02412.

Host glue only: the planners and the blend live in ``highres/tiling.py``. An APPLY_MODEL wrapper splits the model's
input into tiles, calls the rest of the chain (other nodes' wrappers, the diffusion model) per tile or per batch
of same-size tiles, and blends the denoised predictions. Everything that is spatial in that call is cropped to the
tile: the latent, ``c_concat`` (inpainting models' image and mask), any other conditioning tensor of the latent's
size, and ControlNet / T2I-Adapter residuals (computed by ComfyUI on the whole latent and its whole hint before the
model call, so each tile receives the part of the residual at its own position: feature maps by their level, token
sequences of DiT ControlNets by their patch grid). Area and mask conditioning need nothing: ComfyUI crops the
latent to the area before the model call and masks the prediction after, so the tiles tile the area.
"""

from __future__ import annotations

import logging

import comfy.patcher_extension
import torch
from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
from comfy_api.latest import io

from ..caching.store import TILES
from ..highres import tiling as tl
from ..utils.sigma_window import SigmaWindow
from ._host import FRAME_MASKS, RunState, install_hooks
from ._inputs import PreprintNode, advanced, sigma_window_inputs

log = logging.getLogger("preprint.tiling")

CATEGORY = "Preprint/multi-resolution"
WMP = comfy.patcher_extension.WrappersMP
NODE = "Tiled Diffusion (Preprint)"
KEY = "preprint_tiled_diffusion"
TILE_INFO = TILES  # transformer_options entry of each tile call (caches key their state per tile by it)


def _err(message: str) -> ValueError:
    return ValueError(f"{NODE}: {message}")


def _geometry(model) -> tuple[int, int, int]:
    """(latent downscale factor, grid alignment of tile origins, DiT patch size or 0) of a model, or a clear error
    on a model whose latent is not an image."""
    base = model.model
    dims = getattr(base.latent_format, "latent_dimensions", 2)
    if dims != 2:
        raise _err(f"this model is a {type(base).__name__} whose latent has {dims} spatial dimension(s) (video or "
                   "audio); tiled diffusion here serves image models (SD1.x, SD2.x, SDXL, Flux, SD3 and kin).")
    factor = int(getattr(base.latent_format, "spacial_downscale_ratio", 8))
    dm = base.diffusion_model
    if isinstance(dm, UNetModel):
        # tiles whose origins are multiples of the UNet's total down-sampling meet ControlNet residual cells exactly
        return factor, 2 ** (len(dm.channel_mult) - 1), 0
    patch = getattr(dm, "patch_size", 1) or 1
    patch = int(patch[-1] if isinstance(patch, (tuple, list)) else patch)
    return factor, patch, patch


class TiledRun:
    """Per sampling run: the seed the shifted grid's offsets are drawn from."""

    def __init__(self, seed: int):
        self.seed = seed


class TiledRunState(RunState):
    """OUTER_SAMPLE: check the latent before the first step, then run as RunState does."""

    def __init__(self, settings: TiledApply):
        super().__init__(KEY, lambda guider, sigmas, seed: TiledRun(seed))
        self.settings = settings

    def __call__(self, executor, noise, latent_image, sampler, sigmas, *args, **kwargs):
        s = self.settings
        if noise.ndim != 4:
            raise _err(f"the latent has shape {tuple(noise.shape)}; only image latents (batch, channels, height, "
                       "width) can be tiled.")
        h, w = noise.shape[-2:]
        f = s.factor
        if s.tile_h > h and s.tile_w > w:
            # the first point where the latent's size is known, before any model call
            raise _err(f"the tile ({s.tile_w * f} x {s.tile_h * f} px) is larger than the image ({w * f} x "
                       f"{h * f} px) on both sides, so there is nothing to tile: the whole image would be one tile "
                       "and the run the plain model. Use a tile smaller than the image on at least one side (the "
                       "tiles then split that side; about the model's training size, e.g. 512-768 px for SD1.x), or "
                       "remove this node to sample the image whole.")
        if s.tile_h >= h and s.tile_w >= w:  # a tile equal to the image on a side spans it: here both
            log.warning("%s: the tile (%d x %d px) covers the whole image (%d x %d px): this run is not tiled. Use "
                        "a smaller tile to tile it.", NODE, s.tile_w * f, s.tile_h * f, w * f, h * f)
        return super().__call__(executor, noise, latent_image, sampler, sigmas, *args, **kwargs)


class TiledApply:
    """APPLY_MODEL wrapper: the model's denoised prediction, evaluated tile by tile and blended."""

    def __init__(self, tile_h: int, tile_w: int, mode: str, stride_h: int, stride_w: int, weighting: str,
                 batch_size: int, window: SigmaWindow, factor: int, align: int, patch: int):
        self.tile_h, self.tile_w, self.mode = tile_h, tile_w, mode
        self.stride_h, self.stride_w, self.weighting = stride_h, stride_w, weighting
        self.batch_size, self.window = batch_size, window
        self.factor, self.align, self.patch = factor, align, patch

    def plan(self, run: TiledRun | None, sigma: float, height: int, width: int) -> list[tl.Tile]:
        th, tw = min(self.tile_h, height), min(self.tile_w, width)  # an area crop smaller than the tile: one tile
        if self.mode == tl.MODES[1]:
            return tl.overlapping_tiles(height, width, th, tw, min(self.stride_h, th), min(self.stride_w, tw))
        oy, ox = tl.draw_offset(tl.step_generator(run.seed if run else 0, sigma), th, tw, self.align)
        min_size = max(self.align, min(th, tw) // 4)
        return tl.shifted_tiles(height, width, th, tw, oy, ox, min_size)

    def __call__(self, executor, x, t, c_concat, c_crossattn, control, transformer_options, **kwargs):
        sigma = float(t.flatten()[0])
        if x.ndim != 4 or sigma not in self.window:
            return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
        height, width = x.shape[-2:]
        tiles = self.plan(transformer_options.get(KEY), sigma, height, width)
        if len(tiles) == 1:  # the tile is the whole input: the plain model, bit for bit
            return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
        if transformer_options.get(FRAME_MASKS):
            raise ValueError(f"{NODE}: {', '.join(transformer_options[FRAME_MASKS])} places its masks on the whole "
                             "frame and does not follow tiles, so each tile would get the whole frame's masks "
                             "squeezed onto it. Tile without it (or sample its regions at a size that needs one "
                             "tile), or give the areas core's Conditioning (Set Mask), which ComfyUI crops per tile.")
        rows = x.shape[0]
        batchable = _batchable(rows, c_concat, c_crossattn, control, kwargs)
        if not batchable and self.batch_size > 1:
            log.debug("%s: conditioning that is not one row per latent: tiles are evaluated one at a time", NODE)

        def evaluate(group: list[tl.Tile]) -> torch.Tensor:
            n = len(group)
            crops = _Cropper(height, width, self.patch, group)
            to = dict(transformer_options)
            to[TILE_INFO] = (list(group), height, width)
            if n > 1:
                for k in ("cond_or_uncond", "uuids"):  # the batch is n copies of the chunks, tile by tile
                    if isinstance(to.get(k), list):
                        to[k] = to[k] * n
            return executor(crops(x), torch.cat([t] * n) if n > 1 else t, crops.maybe(c_concat),
                            torch.cat([c_crossattn] * n) if n > 1 and c_crossattn is not None else c_crossattn,
                            crops.control(control), to, **{k: crops.maybe(v, rows) for k, v in kwargs.items()})

        return tl.tiled_evaluate(x, tiles, evaluate, self.weighting if self.mode == tl.MODES[1] else "uniform",
                                 self.batch_size if batchable else 1)


def _batchable(rows: int, c_concat, c_crossattn, control, kwargs: dict) -> bool:
    """Tiles can share a call when every tensor of the call has one row per latent row (so n tiles are n copies
    along the batch); a list of tensors (reference latents) or a differently batched tensor keeps them apart."""
    values = [c_concat, c_crossattn, *kwargs.values()]
    if control is not None:
        values += [r for v in control.values() if isinstance(v, list) for r in v]
    for v in values:
        if isinstance(v, torch.Tensor) and v.ndim > 0 and v.shape[0] != rows:
            return False
        if isinstance(v, (list, tuple, dict)) and v is not None and any(isinstance(e, torch.Tensor) for e in v):
            return False
    return True


class _Cropper:
    """Crops one call's tensors to a group of same-size tiles, stacked tile by tile along the batch."""

    def __init__(self, height: int, width: int, patch: int, group: list[tl.Tile]):
        self.height, self.width, self.patch, self.group = height, width, patch, group

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        parts = [tl.crop(x, tile) for tile in self.group]
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def maybe(self, v, rows: int | None = None):
        """A tensor of the latent's height and width is cropped; one row per latent row is repeated per tile;
        anything else passes unchanged (a text embedding, a reference latent, a number)."""
        if not isinstance(v, torch.Tensor):
            return v
        if v.ndim >= 4 and tuple(v.shape[-2:]) == (self.height, self.width):
            return self(v)
        if len(self.group) > 1 and v.ndim > 0 and (rows is None or v.shape[0] == rows):
            return torch.cat([v] * len(self.group))
        return v

    def control(self, control):
        if control is None:
            return None
        out = {}
        for key, value in control.items():
            out[key] = [self.residual(r) for r in value] if isinstance(value, list) else value
        return out

    def residual(self, r):
        if not isinstance(r, torch.Tensor):
            return r
        if r.ndim == 4:
            parts = [tl.feature_crop(r, tile, self.height, self.width) for tile in self.group]
        elif r.ndim == 3 and self.patch:
            parts = [tl.token_crop(r, tile, self.height, self.width, self.patch) for tile in self.group]
        else:
            raise _err(f"a ControlNet residual of shape {tuple(r.shape)} cannot be cropped to a tile (neither a "
                       "feature map nor a DiT token sequence); tile without this ControlNet, or sample untiled.")
        return parts[0] if len(parts) == 1 else torch.cat(parts)


class PreprintTiledDiffusion(PreprintNode):
    NAME = NODE
    ALIASES = ("tiled diffusion", "MultiDiffusion", "Mixture of Diffusers", "SpotDiffusion", "Any-Size-Diffusion",
               "FSTD", "tiles", "upscale", "high resolution", "panorama")

    @classmethod
    def define_schema(cls) -> io.Schema:
        return cls.schema(
            node_id="PreprintTiledDiffusion",
            category=CATEGORY,
            description=(
                "Tiled diffusion for any image size on any image model (SD1.x, SDXL, Flux, SD3): each model "
                "evaluation is done tile by tile at a size the model knows, and the tiles' denoised predictions are "
                "stitched. 'shifted (FSTD)': non-overlapping tiles whose grid moves by a random offset every step, "
                "so each element costs one evaluation and seams of one step are healed by the next (Any-Size-"
                "Diffusion, arXiv:2308.16582; SpotDiffusion, arXiv:2407.15507). 'overlapping (MultiDiffusion)': "
                "tiles at a stride, averaged where they overlap, uniformly (MultiDiffusion, arXiv:2302.08113) or "
                "with Gaussian weights (Mixture of Diffusers, arXiv:2302.02412). Edge tiles reach the image border "
                "without resizing; ControlNet residuals, inpainting inputs and area / mask conditioning follow each "
                "tile. A tile larger than the image on both sides is an error; a tile at least as large as the image "
                "on one side spans that side."),
            inputs=[
                io.Model.Input("model", tooltip="An image model: SD1.x, SD2.x, SDXL, Flux, SD3. It is cloned, "
                                                "never changed."),
                io.Int.Input("tile_width", default=768, min=64, max=16384, step=8,
                             tooltip="Tile width in pixels (a multiple of 8); at most the image's width (a tile "
                                     "larger than the image on both sides is an error). About the model's training "
                                     "size: 512-768 for SD1.x, 1024 for SDXL / Flux / SD3."),
                io.Int.Input("tile_height", default=768, min=64, max=16384, step=8,
                             tooltip="Tile height in pixels (a multiple of 8); at most the image's height."),
                io.Combo.Input("mode", options=list(tl.MODES), default=tl.MODES[0],
                               tooltip="shifted (FSTD): non-overlapping tiles on a grid shifted at random every "
                                       "step, one evaluation per element (fastest). overlapping (MultiDiffusion): "
                                       "tiles at a stride, blended where they overlap (more evaluations)."),
                io.Int.Input("overlap", default=128, min=0, max=16384, step=8,
                             tooltip="Overlapping mode: pixels shared by neighbouring tiles (stride = tile - "
                                     "overlap); must be below the tile's sides. The last tile of a row or column "
                                     "is moved to the image edge, so it may overlap more."),
                io.Combo.Input("weighting", options=list(tl.WEIGHTINGS), default=tl.WEIGHTINGS[0],
                               tooltip="Overlapping mode: how overlapping tiles are averaged. gaussian: centre-"
                                       "weighted (Mixture of Diffusers), softer seams; uniform: plain mean "
                                       "(MultiDiffusion)."),
                advanced(io.Int.Input("tile_batch_size", default=1, min=1, max=64,
                                      tooltip="Tiles of the same size evaluated in one model call: faster where "
                                              "memory allows, same result up to rounding.")),
                *sigma_window_inputs("Tile"),
            ],
            outputs=[io.Model.Output(tooltip="The model, evaluated tile by tile.")],
        )

    @classmethod
    def validate_inputs(cls, tile_width=None, tile_height=None, mode=None, overlap=None, weighting=None,
                        tile_batch_size=None, sigma_start=None, sigma_end=None) -> bool | str:
        return cls.check_widgets(tile_width=tile_width, tile_height=tile_height, mode=mode, overlap=overlap,
                                 weighting=weighting, tile_batch_size=tile_batch_size, sigma_start=sigma_start,
                                 sigma_end=sigma_end)

    @classmethod
    def check_values(cls, tile_width=None, tile_height=None, mode=None, overlap=None, **_) -> None:
        for name, v in (("tile_width", tile_width), ("tile_height", tile_height), ("overlap", overlap)):
            if v is not None and v % 8:
                raise ValueError(f"{name} = {v} is not a multiple of 8 pixels (one latent element); use "
                                 f"{v // 8 * 8} or {v // 8 * 8 + 8}.")
        sides = [v for v in (tile_width, tile_height) if v is not None]
        if overlap is not None and sides and mode != tl.MODES[0] and overlap >= min(sides):
            raise ValueError(f"overlap = {overlap} px is not below the tile's smaller side ({min(sides)} px); tiles "
                             "would not advance. Use a smaller overlap.")

    @classmethod
    def execute(cls, model, tile_width: int, tile_height: int, mode: str, overlap: int, weighting: str,
                tile_batch_size: int = 1, sigma_start: float = -1.0, sigma_end: float = -1.0) -> io.NodeOutput:
        if mode not in tl.MODES:
            raise _err(f"unknown mode {mode!r}; use one of {', '.join(tl.MODES)}.")
        if weighting not in tl.WEIGHTINGS:
            raise _err(f"unknown weighting {weighting!r}; use one of {', '.join(tl.WEIGHTINGS)}.")
        try:
            cls.check_values(tile_width=tile_width, tile_height=tile_height, mode=mode, overlap=overlap)
        except ValueError as e:
            raise _err(str(e)) from None
        factor, align, patch = _geometry(model)
        if tile_width % factor or tile_height % factor or overlap % factor:
            raise _err(f"this model's latent element is {factor} px; tile_width, tile_height and overlap must be "
                       f"multiples of {factor}.")
        tile_h, tile_w = tile_height // factor, tile_width // factor
        step = overlap // factor if mode == tl.MODES[1] else 0
        settings = TiledApply(tile_h, tile_w, mode, tile_h - step, tile_w - step, weighting, max(1, tile_batch_size),
                              SigmaWindow(sigma_start, sigma_end), factor, align, patch)
        m = model.clone()
        install_hooks(m, KEY, {WMP.OUTER_SAMPLE: TiledRunState(settings), WMP.APPLY_MODEL: settings})
        return io.NodeOutput(m)


NODES = [PreprintTiledDiffusion]
