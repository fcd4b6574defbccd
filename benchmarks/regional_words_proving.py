"""The word-attention regional nodes on the trained SD1.5-layout toy (trained at 128x128), each driven through its
node class as ComfyUI runs it; a section's table is written when the section ends.

* ``masks``: Mask From Words (InstDiffEdit). Generator scenes of two objects (distinct colours and shapes, plain
  background, the generator's own caption) are encoded with the toy's VAE, and the node masks one object by its
  colour word, its shape word or both ("red", "circle", "red circle"), for each of the two objects, at 128 px (the
  training size: a 4x4 grid on the 1/4-resolution layers) and 256 px (8x8). Score: IoU of the node's mask with that
  object's ground-truth mask (the generator's rasterised shape). Baselines: the whole image as the mask; the mask
  the node gives for the *other* object's word, scored against this object; the mask for a colour word that is in
  the prompt but not in the picture (the object's colour swapped in the caption). "Right object": the soft map is
  higher on average over the named object than over the other one (chance 0.5). Threshold 0.2 (the node's default,
  the paper's) and, from the node's blurred map (its preview), 0.5 and 0.8. Seed 0, noise level 0.5, 4 steps,
  blur 4 px (defaults).
* ``directed``: Directed Diffusion. Prompts of two objects and no position words ("a red circle and a blue square on
  a white background"); the first object's words (colour and shape) directed into the left or the right half
  (box x 0 / 0.5, width 0.5, full height), against plain generation with the same prompts and seeds. Score: the
  largest object of the directed colour has its centre in the box; also found at all, and
  ``proving.metrics.region_accuracy`` (colour, shape, count inside the half, times 1 - leak) for the directed object;
  objects found per image and the asked background's pixel share, to tell placed objects from a textured image.
  Settings: the node's defaults (20 trailing tokens), the same without trailing tokens, and both objects directed.
* ``lime``: LIME. Generator scenes of two objects; object 1 recoloured by img2img (KSampler at denoise 0.8 on
  SetLatentNoiseMask, as the example workflow edits) inside its bounding box grown by 8 px, the edit prompt being
  the caption with the new colour; with and without LIME (words: new colour and shape). Score: an object of the new
  colour with its centre inside the mask; the same with the asked shape; the old colour still inside the mask;
  mean absolute pixel change outside the mask (``proving.metrics.preservation_error``), next to the VAE round trip
  alone (the floor: every edit is decoded) and plain img2img without the mask.

Sampling: DPM-Solver++ 2M Karras, 20 steps, CFG 5, empty negative.

* ``segments``: Mask From Words' two regions on the masks section's scenes: the attention map (all layers, cut at
  0.5) against LIME's automatic region (feature segments, 8 and 16); IoU with the named object's true mask.

Run: OMP_NUM_THREADS=1 .venv/bin/python benchmarks/regional_words_proving.py [masks] [directed] [lime] [segments]
[--quick] (no section named: all four; --quick: a pipeline check, few scenes and steps, results not written;
--report: only redraw the md from the json). Writes
benchmarks/results/regional_words_proving.{json,md} (sections merged, so they may run separately) and one contact
sheet per section, regional_words_<section>.png.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
QUICK = "--quick" in sys.argv  # read before proving_ground is imported: it takes --quick out of sys.argv
sys.path.insert(0, str(ROOT / "benchmarks"))
from proving_ground import boot, contact_sheet  # noqa: E402

STEPS, CFG, SIZE, SEEDS = 20, 5.0, 128, (0, 1)
MASK_SCENES, MASK_SIZES, THRESHOLDS = 12, (128, 256), (0.2, 0.5, 0.8)
PAIRS, EDITS, DENOISE, MARGIN = 8, 12, 0.8, 8
if QUICK:  # pipeline check only
    STEPS, SEEDS, MASK_SCENES, PAIRS, EDITS = 4, (0,), 2, 2, 2
# (layers, refine) of Mask From Words: the defaults, all layers, and all layers with the words' own map alone
MASK_SETTINGS = (("1/4 resolution", True), ("all resolutions", True), ("all resolutions", False))
WORD_KINDS = ("colour", "shape", "colour + shape")
BACKGROUNDS = ("white", "black", "grey")
HALVES = {"left": (0.0, 0.5), "right": (0.5, 1.0)}


# -- scoring helpers (unit-tested in tests/unit/test_regional_words_proving.py) --------------------------------
def iou(mask: torch.Tensor, truth: torch.Tensor) -> float:
    """Intersection over union of two boolean masks of the same shape (>= 0.5 counts as in); two empty masks agree
    fully (1.0)."""
    if mask.shape != truth.shape:
        raise ValueError(f"iou: masks differ in shape, {tuple(mask.shape)} vs {tuple(truth.shape)}")
    a, b = mask >= 0.5, truth >= 0.5
    union = int((a | b).sum())
    return 1.0 if union == 0 else int((a & b).sum()) / union


def object_mask(scene, index: int, width: int, height: int) -> torch.Tensor:
    """Ground truth: the pixels of ``scene.objects[index]`` (boolean ``[H, W]``), rendered alone without
    anti-aliasing, i.e. the pixels whose centre lies inside the shape. Scenes never overlap objects."""
    from preprint.proving.scenes import Scene, render

    obj = scene.objects[index]
    alone = render(Scene((obj,), scene.background), width, height, antialias=False)
    empty = render(Scene((), scene.background), width, height, antialias=False)
    return (alone - empty).abs().sum(dim=0) > 0


def grown_box(mask: torch.Tensor, margin: int) -> torch.Tensor:
    """A float ``[1, H, W]`` MASK: the bounding box of ``mask``'s pixels grown by ``margin`` pixels each side
    (clipped at the frame), the region a user would paint around an object."""
    nz = torch.nonzero(mask)
    if nz.numel() == 0:
        raise ValueError("grown_box: the mask is empty")
    h, w = mask.shape
    (y0, x0), (y1, x1) = nz.min(dim=0).values.tolist(), nz.max(dim=0).values.tolist()
    out = torch.zeros(1, h, w)
    out[:, max(0, y0 - margin):min(h, y1 + 1 + margin), max(0, x0 - margin):min(w, x1 + 1 + margin)] = 1.0
    return out


def half_mask(side: str, size: int) -> torch.Tensor:
    """``[size, size]`` float mask of the left or right half of the frame."""
    lo, hi = HALVES[side]
    m = torch.zeros(size, size)
    m[:, round(lo * size):round(hi * size)] = 1.0
    return m


def largest_of(image: torch.Tensor, colour: str, shape: str | None = None, within: torch.Tensor | None = None):
    """The largest detected object of ``colour`` (and ``shape`` if given) in ``image`` ``[3, H, W]``, restricted to
    those whose centre lies in ``within`` (``[H, W]``, >= 0.5 in) when given; None if there is none."""
    from preprint.proving.scorers import detect_objects

    h, w = image.shape[1:]
    for d in detect_objects(image):  # largest first
        if d.colour != colour or (shape is not None and d.shape != shape):
            continue
        if within is not None:
            cx, cy = min(int(d.centre[0] * w), w - 1), min(int(d.centre[1] * h), h - 1)
            if within[cy, cx] < 0.5:
                continue
        return d
    return None


def placed_in(image: torch.Tensor, colour: str, side: str) -> tuple[bool, bool]:
    """(found, in the half): whether an object of ``colour`` is detected, and whether the largest one's centre lies
    in the ``side`` half."""
    d = largest_of(image, colour)
    if d is None:
        return False, False
    lo, hi = HALVES[side]
    return True, lo <= d.centre[0] < hi


def background_share(image: torch.Tensor, colour: str) -> float:
    """Share of the pixels of ``image`` ``[3, H, W]`` that the scorers read as the background colour ``colour``."""
    from preprint.proving.palette import palette_names
    from preprint.proving.scorers import segment

    return float((segment(image.float()) == palette_names().index(colour)).float().mean())


def mean(values: list) -> float:
    return round(sum(values) / len(values), 3) if values else float("nan")


# -- running the nodes -----------------------------------------------------------------------------------------
def node(name: str):
    import nodes as comfy_nodes

    return comfy_nodes.NODE_CLASS_MAPPINGS[name]


def two_object_scenes(n: int, seed: int) -> list:
    """``n`` generator scenes of two objects of distinct colours and distinct shapes (so each word names one object),
    plain backgrounds in turn."""
    from preprint.proving.palette import OBJECT_COLOURS, SHAPES
    from preprint.proving.scenes import Background, ObjectSpec, SceneSpec, scene_from_spec

    g, colours, out = torch.Generator().manual_seed(seed), list(OBJECT_COLOURS), []
    for i in range(n):
        ca, cb = (colours[int(k)] for k in torch.randperm(len(colours), generator=g)[:2])
        sa, sb = (SHAPES[int(k)] for k in torch.randperm(len(SHAPES), generator=g)[:2])
        spec = SceneSpec((ObjectSpec(ca, sa), ObjectSpec(cb, sb)), (), Background((BACKGROUNDS[i % 3],)))
        out.append(scene_from_spec(spec, g))
    return out


def absent_colour(scene, index: int) -> str:
    """A colour not in the scene, fixed per scene and object (the first palette colour after the object's own)."""
    from preprint.proving.palette import OBJECT_COLOURS

    colours, used = list(OBJECT_COLOURS), {o.colour for o in scene.objects}
    start = colours.index(scene.objects[index].colour)
    return next(c for c in colours[start + 1:] + colours[:start] if c not in used)


def recoloured(scene, index: int, colour: str):
    objects = list(scene.objects)
    objects[index] = dataclasses.replace(objects[index], colour=colour)
    return dataclasses.replace(scene, objects=tuple(objects))


def words_of(obj, kind: str) -> str:
    return {"colour": obj.colour, "shape": obj.shape, "colour + shape": f"{obj.colour} {obj.shape}"}[kind]


def mask_from_words(model, clip, latent, prompt: str, words: str, setting: tuple[str, bool]
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(binary mask at threshold 0.2, the blurred map in [0, 1]) from the node; the map is read back from the node's
    preview, whose green channel is 0.6 x the map."""
    out = node("PreprintMaskFromWords").execute(model=model, clip=clip, latent={"samples": latent}, prompt=prompt,
                                                words=words, seed=0, noise_level=0.5, steps=4, layers=setting[0],
                                                refine=setting[1], threshold=THRESHOLDS[0], blur=4.0)
    mask, preview = out.result
    return mask[0], preview[0, ..., 1] / 0.6


def grid_ceiling(truth: torch.Tensor, size: int) -> float:
    """IoU of the ground truth after the node's own map-to-mask step from a perfect map on its grid (the truth
    averaged onto latent/4 cells): what the grid allows at threshold 0.2."""
    from preprint.regional.word_attention import mask_from_map

    cells = size // 8 // 4
    coarse = F.adaptive_avg_pool2d(truth.float()[None, None], (cells, cells))[0]
    mask, _ = mask_from_map(coarse, size, size, 4.0, THRESHOLDS[0])
    return iou(mask[0], truth)


def thresholded(mask: torch.Tensor, smooth: torch.Tensor) -> dict[float, torch.Tensor]:
    """The node's mask at its threshold (the first), and its blurred map cut at the others."""
    return {t: mask if t == THRESHOLDS[0] else (smooth >= t).float() for t in THRESHOLDS}


def section_masks(model, clip, vae) -> tuple[dict, torch.Tensor]:
    from preprint.proving.scenes import caption_of, render, to_comfy_image

    scenes = two_object_scenes(MASK_SCENES, seed=3)
    rows, columns = [], {}  # contact sheet: per scene, image, truth of object 0, its colour word's maps
    for size in MASK_SIZES:
        acc: dict = {}
        ceiling, whole = [], []
        for i, scene in enumerate(scenes):
            image = render(scene, size, size)
            latent = vae.encode(to_comfy_image(image))
            prompt = caption_of(scene)
            truths = [object_mask(scene, j, size, size) for j in range(2)]
            if size == SIZE and i < 8:
                columns[i] = [image, truths[0].float().expand(3, -1, -1)]
            for j in range(2):
                whole.append(iou(torch.ones(size, size), truths[j]))
                ceiling.append(grid_ceiling(truths[j], size))
            for setting in MASK_SETTINGS:
                for kind in WORD_KINDS:
                    a = acc.setdefault((setting, kind), {"own": {t: [] for t in THRESHOLDS},
                                                         "other": {t: [] for t in THRESHOLDS},
                                                         "absent": {t: [] for t in THRESHOLDS},
                                                         "right": [], "area": []})
                    cuts = []
                    for j, obj in enumerate(scene.objects):
                        mask, smooth = mask_from_words(model, clip, latent, prompt, words_of(obj, kind), setting)
                        cuts.append(thresholded(mask, smooth))
                        if j == 0 and kind == "colour" and i in columns and setting[1]:
                            shown = to_rgb(smooth, mask)
                            columns[i].append(shown if size == SIZE else F.adaptive_avg_pool2d(shown, SIZE))
                        a["right"].append(float(smooth[truths[j]].mean() > smooth[truths[1 - j]].mean()))
                        a["area"].append(float(mask.mean()))
                    for j in range(2):  # each object's word against its object; the other object's word against it
                        for t in THRESHOLDS:
                            a["own"][t].append(iou(cuts[j][t], truths[j]))
                            a["other"][t].append(iou(cuts[1 - j][t], truths[j]))
                    if kind == "colour":  # a colour word in the prompt that names nothing in the picture
                        for j in range(2):
                            new = absent_colour(scene, j)
                            swapped = caption_of(recoloured(scene, j, new))
                            cut = thresholded(*mask_from_words(model, clip, latent, swapped, new, setting))
                            for t in THRESHOLDS:
                                a["absent"][t].append(iou(cut[t], truths[j]))
        for ((layers, refine), kind), a in acc.items():
            row = {"size": size, "layers": layers, "refine": refine, "words": kind}
            for t in THRESHOLDS:
                row[f"iou_{t}"] = mean(a["own"][t])
                row[f"other_word_{t}"] = mean(a["other"][t])
                row[f"absent_word_{t}"] = mean(a["absent"][t]) if a["absent"][t] else None
            rows.append({**row, "whole_image": mean(whole), "grid_ceiling": mean(ceiling),
                         "right_object": mean(a["right"]), "mask_area": mean(a["area"]), "masks": len(a["right"])})
            print(rows[-1], flush=True)
    cols = [columns[i] for i in sorted(columns)]
    grid = torch.stack([c[r] for r in range(len(cols[0])) for c in cols])
    return {"scenes": MASK_SCENES, "rows": rows}, grid


def to_rgb(smooth: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The node's preview look: the map in grey, the mask tinted red, ``[3, H, W]``."""
    grey = 0.6 * smooth
    return torch.stack([grey + 0.4 * mask, grey, grey]).clamp(0, 1)


# -- Directed Diffusion ----------------------------------------------------------------------------------------
def pair_prompts(n: int, seed: int) -> list[dict]:
    """Two objects of distinct colours and shapes, no position words."""
    return [{"objects": [(o.colour, o.shape) for o in scene.objects], "background": scene.background.colours[0],
             "prompt": " and ".join(f"a {o.colour} {o.shape}" for o in scene.objects)
             + f" on {scene.background.phrase()}"} for scene in two_object_scenes(n, seed)]


def sample(model, clip, vae, prompt: str, seed: int, latent: dict | None = None, denoise: float = 1.0):
    """KSampler + VAE Decode as the nodes run them: an image ``[3, H, W]`` in [0, 1]."""
    import nodes as comfy_nodes
    from preprint.proving.models import encode
    from preprint.proving.scenes import from_comfy_image

    latent = latent or {"samples": torch.zeros(1, 4, SIZE // 8, SIZE // 8)}
    with torch.no_grad():
        out = comfy_nodes.KSampler().sample(model, seed, STEPS, CFG, "dpmpp_2m", "karras", encode(clip, prompt),
                                            encode(clip, ""), latent, denoise=denoise)[0]
        return from_comfy_image(vae.decode(out["samples"])).clamp(0, 1)[0]


DIRECTED = {  # name -> (strength, end_percent, both objects, trailing tokens of the first node)
    "Directed Diffusion (defaults: strength 1, first 10%, 20 trailing tokens)": (1.0, 0.1, False, 20),
    "Directed Diffusion (defaults, no trailing tokens)": (1.0, 0.1, False, 0),
    "Directed Diffusion, both objects to opposite halves (defaults)": (1.0, 0.1, True, 20),
}


def directed_model(model, clip, prompt: str, words: list[str], sides: list[str], strength: float, end: float,
                   trailing: int):
    """The model with one Directed Diffusion node per word group (chained), each into its half; the trailing tokens
    go with the first (as the example workflow does)."""
    m = model
    for k, (w, side) in enumerate(zip(words, sides, strict=True)):
        x = HALVES[side][0]
        m = node("PreprintDirectedDiffusion").execute(model=m, clip=clip, prompt=prompt, words=w, x=x, y=0.0,
                                                      width=0.5, height=1.0, strength=strength,
                                                      trailing_tokens=trailing if k == 0 else 0,
                                                      end_percent=end).result[0]
    return m


def section_directed(model, clip, vae) -> tuple[dict, torch.Tensor]:
    from preprint.proving.metrics import region_accuracy
    from preprint.proving.scenes import SceneSpec, parse_caption
    from preprint.proving.scorers import detect_objects

    names = ["plain", *DIRECTED]
    score = {k: {"found": [], "in_box": [], "in_box_if_found": [], "region": [], "second_in_box": [], "objects": [],
                 "background": []} for k in names}
    sheet = {k: [] for k in names}
    for case in pair_prompts(PAIRS, seed=21):
        (ca, sa), (cb, sb) = case["objects"]
        spec_a = SceneSpec((parse_caption(case["prompt"]).objects[0],))
        for seed in SEEDS:
            plain = sample(model, clip, vae, case["prompt"], seed)
            for side, other in (("left", "right"), ("right", "left")):
                runs = {"plain": plain}
                for name, (strength, end, both, trailing) in DIRECTED.items():
                    words, sides = ([f"{ca} {sa}", f"{cb} {sb}"], [side, other]) if both else ([f"{ca} {sa}"], [side])
                    m = directed_model(model, clip, case["prompt"], words, sides, strength, end, trailing)
                    runs[name] = sample(m, clip, vae, case["prompt"], seed)
                for name, img in runs.items():
                    found, inside = placed_in(img, ca, side)
                    s = score[name]
                    s["found"].append(found)
                    s["in_box"].append(inside)
                    if found:
                        s["in_box_if_found"].append(inside)
                    s["region"].append(region_accuracy(img, half_mask(side, SIZE), spec_a).overall)
                    s["second_in_box"].append(placed_in(img, cb, other)[1])
                    s["objects"].append(len(detect_objects(img)))  # a scene shows 2; a textured mess many
                    s["background"].append(background_share(img, case["background"]))
                    if side == "left" and seed == SEEDS[0]:
                        sheet[name].append(img)
    rows = [{"method": k, "runs": len(v["found"]), **{m: mean([float(x) for x in vals]) for m, vals in v.items()}}
            for k, v in score.items()]
    for r in rows:
        print(r, flush=True)
    grid = torch.stack([img for k in names for img in sheet[k]])
    return {"pairs": PAIRS, "seeds": list(SEEDS), "rows": rows}, grid


# -- LIME ------------------------------------------------------------------------------------------------------
LIME = {"no LIME": None, "LIME (defaults: strength 1, end_percent 0.5)": 0.5, "LIME (end_percent 1.0)": 1.0}


def section_lime(model, clip, vae) -> tuple[dict, torch.Tensor]:
    import nodes as comfy_nodes
    from preprint.proving.metrics import preservation_error, region_accuracy
    from preprint.proving.scenes import SceneSpec, caption_of, parse_caption, render, to_comfy_image

    names = ["VAE round trip", "img2img, no mask", *LIME]
    score = {k: {"recoloured": [], "recoloured_shape": [], "old_colour_left": [], "change_outside": [],
                 "new_colour_leak": []} for k in names}
    sheet = {k: [] for k in ["original", *names]}
    for i, scene in enumerate(two_object_scenes(EDITS, seed=8)):
        image = render(scene, SIZE, SIZE)
        target = object_mask(scene, 1, SIZE, SIZE)
        region = grown_box(target, MARGIN)
        old, shape = scene.objects[1].colour, scene.objects[1].shape
        new = absent_colour(scene, 1)
        edit = caption_of(recoloured(scene, 1, new))
        spec = SceneSpec((parse_caption(f"a {new} {shape}").objects[0],))
        latent = {"samples": vae.encode(to_comfy_image(image))}
        masked = comfy_nodes.SetLatentNoiseMask().set_mask(latent, region)[0]
        for seed in SEEDS:
            runs = {}
            with torch.no_grad():
                runs["VAE round trip"] = vae.decode(latent["samples"]).movedim(-1, 1).clamp(0, 1)[0]
            runs["img2img, no mask"] = sample(model, clip, vae, edit, seed, latent, DENOISE)
            for name, end in LIME.items():
                m = model if end is None else node("PreprintLIME").execute(
                    model=model, clip=clip, prompt=edit, words=f"{new} {shape}", mask=region, strength=1.0,
                    end_percent=end, keep_start_token=False).result[0]
                runs[name] = sample(m, clip, vae, edit, seed, masked, DENOISE)
            for name, img in runs.items():
                s = score[name]
                s["recoloured"].append(largest_of(img, new, within=region[0]) is not None)
                s["recoloured_shape"].append(largest_of(img, new, shape, within=region[0]) is not None)
                s["old_colour_left"].append(largest_of(img, old, within=region[0]) is not None)
                s["change_outside"].append(preservation_error(image, img, region))
                s["new_colour_leak"].append(region_accuracy(img, region, spec).leak)
                if seed == SEEDS[0] and i < 12:
                    sheet[name].append(img)
            if seed == SEEDS[0] and i < 12:
                sheet["original"].append(image * (0.6 + 0.4 * region))  # the edit region shown lighter
    rows = [{"method": k, "runs": len(v["recoloured"]), **{m: mean([float(x) for x in vals])
                                                            for m, vals in v.items()}} for k, v in score.items()]
    for r in rows:
        print(r, flush=True)
    grid = torch.stack([img for k in sheet for img in sheet[k]])
    return {"edits": EDITS, "seeds": list(SEEDS), "denoise": DENOISE, "margin_px": MARGIN, "rows": rows}, grid


# -- results ---------------------------------------------------------------------------------------------------
# Mask From Words region settings compared in ``segments``: the best attention-map setting of ``masks`` (all layers,
# refine on, cut at 0.5) against LIME's automatic region at the node's defaults and with twice the segments
SEGMENT_SETTINGS = (("attention map, all layers, cut at 0.5", {"region": "attention map (InstDiffEdit)",
                                                               "threshold": 0.5}),
                    ("LIME segments, 8 (default)", {"region": "feature segments (LIME)", "segments": 8}),
                    ("LIME segments, 16", {"region": "feature segments (LIME)", "segments": 16}))


def section_segments(model, clip, vae) -> tuple[dict, torch.Tensor]:
    """Mask From Words' two regions on the ``masks`` scenes: IoU with the named object's true mask (own word, the other
    object's word), mask area, and a whole-image baseline; shape and colour words, 128 and 256 px."""
    from preprint.proving.scenes import caption_of, render, to_comfy_image

    scenes = two_object_scenes(MASK_SCENES, seed=3)
    rows, columns = [], {}
    for size in MASK_SIZES:
        acc: dict = {}
        whole = []
        for i, scene in enumerate(scenes):
            image = render(scene, size, size)
            latent = vae.encode(to_comfy_image(image))
            prompt = caption_of(scene)
            truths = [object_mask(scene, j, size, size) for j in range(2)]
            whole += [iou(torch.ones(size, size), t) for t in truths]
            if size == SIZE and i < 8:
                columns[i] = [image, truths[0].float().expand(3, -1, -1)]
            for label, setting in SEGMENT_SETTINGS:
                for kind in ("shape", "colour"):
                    a = acc.setdefault((label, kind), {"own": [], "other": [], "area": []})
                    masks = []
                    for obj in scene.objects:
                        out = node("PreprintMaskFromWords").execute(
                            model=model, clip=clip, latent={"samples": latent}, prompt=prompt,
                            words=words_of(obj, kind), seed=0, noise_level=0.5, steps=4, layers="all resolutions",
                            refine=True, blur=4.0, **{"threshold": 0.5, **setting})
                        masks.append(out.result[0][0])
                        if size == SIZE and i in columns and kind == "shape" and len(masks) == 1:
                            columns[i].append(out.result[1][0].permute(2, 0, 1))
                    for j in range(2):
                        a["own"].append(iou(masks[j], truths[j]))
                        a["other"].append(iou(masks[1 - j], truths[j]))
                        a["area"].append(float(masks[j].mean()))
        for (label, kind), a in acc.items():
            rows.append({"size": size, "setting": label, "words": kind, "iou": mean(a["own"]),
                         "other_word": mean(a["other"]), "mask_area": mean(a["area"]), "whole_image": mean(whole),
                         "masks": len(a["own"])})
            print(rows[-1], flush=True)
    cols = [columns[i] for i in sorted(columns)]
    grid = torch.stack([c[r] for r in range(len(cols[0])) for c in cols])
    return {"scenes": MASK_SCENES, "rows": rows}, grid


SECTIONS = {"masks": section_masks, "directed": section_directed, "lime": section_lime,
            "segments": section_segments}


def table(rows: list[dict], columns: list[tuple[str, str]]) -> list[str]:
    out = ["| " + " | ".join(title for _, title in columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        out.append("| " + " | ".join("" if r.get(k) is None else str(r[k]) for k, _ in columns) + " |")
    return out


def masks_text(res: dict) -> list[str]:
    rows = []
    for r in res["rows"]:
        cells = {f"t{t}": " / ".join("-" if r[k] is None else str(r[k])
                                     for k in (f"iou_{t}", f"other_word_{t}", f"absent_word_{t}"))
                 for t in THRESHOLDS}
        rows.append({**r, **cells, "refine": "on" if r["refine"] else "off"})
    cols = [("size", "px"), ("layers", "layers"), ("refine", "refine"), ("words", "words"),
            *((f"t{t}", f"IoU @ {t}{' (default)' if t == THRESHOLDS[0] else ''}: own / other's word / absent word")
              for t in THRESHOLDS),
            ("whole_image", "whole image"), ("grid_ceiling", "grid ceiling @ 0.2"), ("right_object", "right object"),
            ("mask_area", "mask area @ 0.2")]
    return [f"{res['scenes']} scenes x 2 objects per row, each object masked by its own word. IoU with the object's "
            "ground-truth mask of: the mask for its own word; the mask the node gives for the other object's word "
            "(same scene and prompt); the mask for a colour word that is in the prompt but not in the picture (the "
            "object's colour swapped in the caption; colour rows only); the whole image. Threshold 0.2 is the node's "
            "own mask; 0.5 and 0.8 cut the node's blurred map (its preview). Grid ceiling: a perfect map on the "
            "node's grid (latent/4: 4x4 at 128 px, 8x8 at 256 px) through the node's upsample, blur and threshold. "
            "Right object: the node's map is higher over the named object than over the other (chance 0.5).", "",
            *table(rows, cols), "", *masks_summary(res["rows"])]


def masks_summary(rows: list[dict]) -> list[str]:
    """Sentences read off the table: the defaults against the baselines, and each word kind's best setting."""
    d = next(r for r in rows if r["size"] == SIZE and r["layers"] == MASK_SETTINGS[0][0] and r["refine"]
             and r["words"] == "colour")
    out = [f"- Defaults at the toy's size ({SIZE} px, {d['layers']} layers, refine on, threshold {THRESHOLDS[0]}): "
           f"the mask covers {d['mask_area']:.0%} of the frame and its IoU, {d['iou_0.2']}, is the whole image's "
           f"({d['whole_image']}); the other object's word gives {d['other_word_0.2']}."]
    for kind in WORD_KINDS:
        r, t = max(((r, t) for r in rows if r["words"] == kind for t in THRESHOLDS),
                   key=lambda rt: rt[0][f"iou_{rt[1]}"])
        out.append(f"- {kind} words, best row: IoU {r[f'iou_{t}']} ({r['size']} px, {r['layers']} layers, refine "
                   f"{'on' if r['refine'] else 'off'}, threshold {t}) against {r[f'other_word_{t}']} for the other "
                   f"object's word; right object {r['right_object']}.")
    return out


def directed_text(res: dict) -> list[str]:
    cols = [("method", "method"), ("runs", "runs"), ("found", "directed colour found"),
            ("in_box", "in its half"), ("in_box_if_found", "in its half, when found"),
            ("region", "region score"), ("second_in_box", "other object in the other half"),
            ("objects", "objects found / image"), ("background", "asked background share")]
    return [f"{res['pairs']} prompts x {len(res['seeds'])} seeds x 2 halves; plain: the same prompts and seeds "
            "without the node, scored against the same halves. Directed: the first object's colour and shape "
            "words. In its half: the largest object of that colour has its centre in the half (a miss when none is "
            "found). Region score: proving.metrics.region_accuracy of the directed object and its half. Objects found "
            "and the share of pixels read as the asked background tell a scene (2 objects on a plain background) from "
            "a textured image whose colour blobs the position score would also count.", "",
            *table(res["rows"], cols), "",
            *(f"- {r['method']}: in its half {r['in_box']} against {res['rows'][0]['in_box']} for plain generation, "
              f"with {r.get('objects')} objects found per image against {res['rows'][0].get('objects')}."
              for r in res["rows"][1:])]


def lime_text(res: dict) -> list[str]:
    cols = [("method", "method"), ("runs", "runs"), ("recoloured", "new colour inside the mask"),
            ("recoloured_shape", "new colour and shape inside"), ("old_colour_left", "old colour still inside"),
            ("change_outside", "pixel change outside the mask"), ("new_colour_leak", "new colour outside the mask")]
    return [f"{res['edits']} scenes x {len(res['seeds'])} seeds; one object recoloured by img2img at denoise "
            f"{res['denoise']} inside its bounding box grown by {res['margin_px']} px (SetLatentNoiseMask), the edit "
            "prompt being the caption with the new colour; LIME's words: the new colour and the shape. VAE round "
            "trip: the original encoded and decoded, no sampling (the floor for the change outside). img2img, no "
            "mask: the same edit over the whole latent. Pixel change: mean absolute difference to the original, "
            "[0, 1] scale.", "",
            *table(res["rows"], cols), "", *lime_summary(res["rows"])]


def lime_summary(rows: list[dict]) -> list[str]:
    by = {r["method"]: r for r in rows}
    floor, plain = by["VAE round trip"], by["no LIME"]
    return [f"- {k}: new colour inside the mask {by[k]['recoloured']} (masked edit without LIME "
            f"{plain['recoloured']}); change outside {by[k]['change_outside']} against the VAE round trip's "
            f"{floor['change_outside']}." for k in LIME if k != "no LIME"]


def segments_text(res: dict) -> list[str]:
    cols = [("size", "px"), ("setting", "region"), ("words", "words"), ("iou", "IoU, own word"),
            ("other_word", "IoU, other object's word"), ("mask_area", "mask area"), ("whole_image", "whole image")]
    return [f"{res['scenes']} scenes x 2 objects per row (the masks section's scenes), each object masked by its own "
            "word; Mask From Words at noise level 0.5, 4 steps, all layers, refine on, blur 4 px. The attention-map "
            "row cuts the map at 0.5 (the best cut of the masks section); the LIME rows are the automatic region "
            "(decoder-feature segments holding the words' most attended pixels, top fraction 0.0244).", "",
            *table(res["rows"], cols)]


TEXT = {"masks": ("Mask From Words (InstDiffEdit) against ground-truth object masks", masks_text),
        "segments": ("Mask From Words: LIME's automatic region against the attention map", segments_text),
        "directed": ("Directed Diffusion: the directed object in its half", directed_text),
        "lime": ("LIME: recolouring one object inside a mask", lime_text)}


def write(section: str, result: dict) -> None:
    """Merge one finished section into the results file and redraw the whole report."""
    path = RESULTS / "regional_words_proving.json"
    merged = json.loads(path.read_text()) if path.exists() else {}
    merged[section] = result
    path.write_text(json.dumps(merged, indent=1) + "\n")
    redraw(merged)


def redraw(merged: dict) -> None:
    lines = ["# Word-attention regional nodes on the trained SD1.5-layout toy", "",
             "Every section: the node classes run as ComfyUI runs them, on the toy loaded in-process (see the "
             "docstring of benchmarks/regional_words_proving.py). Sampling: DPM-Solver++ 2M Karras, "
             f"{STEPS} steps, CFG {CFG}, {SIZE}x{SIZE}. Read with proving_ground.md: the toy follows colour words "
             "weakly, so these figures measure the toy as much as the techniques."]
    for key, (title, text) in TEXT.items():
        if key in merged:
            r = merged[key]
            lines += ["", f"## {title}", "", f"Run: `{r['command']}` ({r['minutes']} min; contact sheet "
                      f"regional_words_{key}.png: {r['sheet']}).", "", *text(r)]
    (RESULTS / "regional_words_proving.md").write_text("\n".join(lines) + "\n")


SHEETS = {"masks": "per scene (columns): the image, the ground truth of its first object, then the node's map and "
                   "mask (red) for that object's colour word on the 1/4-resolution layers and on all layers at "
                   "128 px, and the same two at 256 px (shown halved)",
          "directed": "rows: plain, then each Directed Diffusion setting, the first object directed to the left "
                      "half; first seed",
          "segments": "per scene (columns): the image, the ground truth of its first object, then the node's preview "
                      "for that object's shape word with each region setting (segments in grey, mask red)",
          "lime": "rows: the original (edit region lighter), VAE round trip, img2img without mask, the masked edit "
                  "without LIME, then with LIME (defaults, end_percent 1.0); first seed"}


def main() -> None:
    if "--report" in sys.argv:  # redraw the md from the json, nothing run
        redraw(json.loads((RESULTS / "regional_words_proving.json").read_text()))
        return
    boot()
    import comfy.utils

    from preprint.proving.models import load_toy

    comfy.utils.PROGRESS_BAR_ENABLED = False
    model, clip, vae = load_toy("sd15")
    chosen = [a for a in sys.argv[1:] if a in SECTIONS] or list(SECTIONS)
    command = "OMP_NUM_THREADS=1 .venv/bin/python benchmarks/regional_words_proving.py " + " ".join(sys.argv[1:])
    for section in chosen:
        t0 = time.perf_counter()
        result, grid = SECTIONS[section](model, clip, vae)
        result.update(command=command.strip(), minutes=round((time.perf_counter() - t0) / 60, 1),
                      sheet=SHEETS[section])
        columns = {"masks": min(8, MASK_SCENES), "segments": min(8, MASK_SCENES),
                   "directed": len(grid) // (1 + len(DIRECTED)),
                   "lime": len(grid) // (3 + len(LIME))}[section]
        if QUICK:
            print(json.dumps(result)[:2000])
            continue
        RESULTS.mkdir(parents=True, exist_ok=True)
        contact_sheet(grid, RESULTS / f"regional_words_{section}.png", columns=columns)
        write(section, result)
        print(f"{section}: written ({result['minutes']} min)", flush=True)


if __name__ == "__main__":
    main()
