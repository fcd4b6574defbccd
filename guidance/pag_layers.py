"""Readable, strict selection of attention layers (and heads) for perturbation guidance (pure torch-free).

Grammar (whitespace ignored, items separated by commas)::

    item   := group ":" blocks [ "." inner ] [ "[" heads "]" ]
    blocks := N | N-M | *            inner := N | N-M | *            heads := N | N-M {"," N | N-M}

Groups by model family:

* UNet (SD1.x, SDXL): ``input``, ``middle``, ``output``, block numbers as ComfyUI counts them
  (``input_blocks[i]``, ``middle_block`` = 0, ``output_blocks[i]``); ``inner`` picks transformer depth
  indices inside a block (SDXL has 2 or 10 per block). ``"input:4-8, middle:0, output:0-2"``.
* Flux-style DiT: ``double`` and ``single`` block indices. ``"double:0-18, single:10-37"``.
* SD3 / MMDiT: ``joint`` block indices. ``"joint:13"``.
* Qwen-Image, Wan: ``double`` (their one stack of blocks). ``"double:30"``.
* HunyuanVideo: ``double`` and ``single``, as Flux.

Heads (HeadHunter-style head selection, arXiv:2506.10978): ``"joint:12[2,5], joint:13[0-3]"``.

A range may span blocks without self-attention (e.g. a UNet down-sampler), which are skipped, but it must
lie inside the model and select at least one layer; a single index must name a layer that exists.
Mistakes raise :class:`LayerSpecError` listing what the model does have.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

UNET_GROUPS = ("input", "middle", "output")
FLUX_GROUPS = ("double", "single")
MMDIT_GROUPS = ("joint",)
# Qwen-Image and Wan have one stack of blocks, addressed as ComfyUI's block patches address them ("double_block")
FAMILY_GROUPS = {"unet": UNET_GROUPS, "flux": FLUX_GROUPS, "mmdit": MMDIT_GROUPS, "qwen_image": ("double",),
                 "wan": ("double",), "hunyuan_video": FLUX_GROUPS}
FAMILY_NAMES = {"unet": "UNet (SD1.x / SD2.x / SDXL)", "flux": "Flux-style DiT", "mmdit": "SD3 / MMDiT",
                "qwen_image": "Qwen-Image", "wan": "Wan video DiT", "hunyuan_video": "HunyuanVideo"}

# (group, block, transformer index or None for DiT blocks)
LayerKey = tuple[str, int, "int | None"]


class LayerSpecError(ValueError):
    pass


@dataclass(frozen=True)
class BlockInfo:
    depth: int  # transformer blocks with self-attention inside this block (1 for DiT blocks)
    heads: int


@dataclass(frozen=True)
class AttentionLayout:
    """Which self-attention layers a model has: ``blocks[group][index] = BlockInfo``; ``extent[group]`` is
    the number of blocks the group has in total (with or without attention)."""

    family: str
    blocks: dict[str, dict[int, BlockInfo]]
    extent: dict[str, int]

    def describe(self) -> str:
        parts = []
        for group in FAMILY_GROUPS[self.family]:
            found = self.blocks.get(group, {})
            if found:
                parts.append(f"{group}:{_compact(found)}")
        heads = sorted({i.heads for g in self.blocks.values() for i in g.values()})
        return "; ".join(parts) + f" (heads per layer: {'/'.join(map(str, heads))})"

    @property
    def layer_count(self) -> int:
        return sum(i.depth for g in self.blocks.values() for i in g.values())


def _compact(found: dict[int, BlockInfo]) -> str:
    """``{1,2,4,5,7,8}`` -> ``"1-2,4-5,7-8"``; runs split where the transformer depth changes, shown as
    ``"7-8(.0-9)"`` when a block holds several transformer layers."""
    out: list[str] = []
    idx = sorted(found)
    start = idx[0]
    for j, n in enumerate(idx):
        last = j + 1 == len(idx) or idx[j + 1] != n + 1 or found[idx[j + 1]].depth != found[n].depth
        if last:
            run = f"{start}" if start == n else f"{start}-{n}"
            depth = found[n].depth
            out.append(run if depth == 1 else f"{run}(.0-{depth - 1})")
            if j + 1 < len(idx):
                start = idx[j + 1]
    return ",".join(out)


_ITEM = re.compile(r"^(?P<group>[a-z_]+):(?P<blocks>\*|\d+(?:-\d+)?)(?:\.(?P<inner>\*|\d+(?:-\d+)?))?"
                   r"(?:\[(?P<heads>[\d,\-]+)\])?$")


def _split_items(text: str) -> list[str]:
    items, depth, cur = [], 0, ""
    for ch in text:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        if ch == "," and depth == 0:
            items.append(cur)
            cur = ""
        else:
            cur += ch
    items.append(cur)
    return [i for i in items if i]


def _range(text: str, what: str, item: str) -> tuple[int, int] | None:
    if text == "*":
        return None
    if "-" in text:
        a, b = (int(x) for x in text.split("-"))
        if b < a:
            raise LayerSpecError(f"{what} range {text!r} in {item!r} runs backwards; write {b}-{a}.")
        return a, b
    return int(text), int(text)


def _heads(text: str, item: str) -> tuple[int, ...]:
    out: set[int] = set()
    for part in text.split(","):
        if not part:
            raise LayerSpecError(f"empty head number in {item!r}: write heads like [0,3,5-7].")
        a, b = _range(part, "head", item)  # type: ignore[misc]
        out.update(range(a, b + 1))
    return tuple(sorted(out))


def check_syntax(spec: str) -> None:
    """Check a layer list without a model (what the editor can check before a run): every item readable, its
    group known to some model family, no backwards range, heads well formed. Empty means the model's default."""
    text = re.sub(r"\s+", "", spec.lower())
    known = sorted({g for groups in FAMILY_GROUPS.values() for g in groups})
    for item in _split_items(text):
        m = _ITEM.match(item)
        if m is None:
            raise LayerSpecError(
                f"cannot read {item!r}. Write items like 'group:block', 'group:first-last', 'group:block.inner' "
                f"(UNet transformer depth) or 'group:block[heads]', separated by commas; groups: {', '.join(known)}.")
        if m["group"] not in known:
            raise LayerSpecError(f"{item!r}: no model has a layer group {m['group']!r}; groups: {', '.join(known)}.")
        _range(m["blocks"], "block", item)
        if m["inner"]:
            _range(m["inner"], "inner", item)
        if m["heads"]:
            _heads(m["heads"], item)


def parse_and_resolve(spec: str, layout: AttentionLayout) -> dict[LayerKey, tuple[int, ...] | None]:
    """Parse ``spec`` against ``layout``: each selected layer -> its heads (``None`` = all heads)."""
    text = re.sub(r"\s+", "", spec.lower())
    if not text:
        raise LayerSpecError(f"empty layer list. This model has: {layout.describe()}")
    groups = FAMILY_GROUPS[layout.family]
    selected: dict[LayerKey, tuple[int, ...] | None] = {}
    for item in _split_items(text):
        m = _ITEM.match(item)
        if m is None:
            raise LayerSpecError(
                f"cannot read {item!r}. Write items like 'group:block', 'group:first-last', 'group:block.inner' "
                f"(UNet transformer depth) or 'group:block[heads]', separated by commas. "
                f"This model has: {layout.describe()}")
        group = m["group"]
        if group not in groups:
            raise LayerSpecError(
                f"{item!r}: this is a {FAMILY_NAMES[layout.family]} model; its layer groups are "
                f"{', '.join(groups)}, not {group!r}. Valid layers: {layout.describe()}")
        found = layout.blocks.get(group, {})
        if not found:
            raise LayerSpecError(f"{item!r}: this model has no self-attention in its {group} blocks. "
                                 f"Valid layers: {layout.describe()}")
        rng = _range(m["blocks"], "block", item)
        extent = layout.extent.get(group, 0)
        if rng is None:
            blocks = sorted(found)
        else:
            a, b = rng
            if a == b and a not in found:
                raise LayerSpecError(f"{item!r}: {group} block {a} has no self-attention layer (or does not exist). "
                                     f"Valid layers: {layout.describe()}")
            if b >= extent:
                raise LayerSpecError(f"{item!r}: this model's {group} blocks are numbered 0-{extent - 1}. "
                                     f"Valid layers: {layout.describe()}")
            blocks = [i for i in range(a, b + 1) if i in found]
            if not blocks:
                raise LayerSpecError(f"{item!r} selects no self-attention layer. Valid layers: {layout.describe()}")
        heads = _heads(m["heads"], item) if m["heads"] else None
        for blk in blocks:
            info = found[blk]
            if heads is not None and heads[-1] >= info.heads:
                raise LayerSpecError(f"{item!r}: head {heads[-1]} does not exist; {group} block {blk} has heads "
                                     f"0-{info.heads - 1}.")
            if layout.family == "unet":
                inner = _range(m["inner"], "transformer index", item) if m["inner"] else None
                if inner is not None and inner[1] >= info.depth:
                    raise LayerSpecError(f"{item!r}: {group} block {blk} has transformer indices 0-{info.depth - 1}. "
                                         f"Valid layers: {layout.describe()}")
                idxs = range(info.depth) if inner is None else range(inner[0], inner[1] + 1)
                keys: list[LayerKey] = [(group, blk, t) for t in idxs]
            else:
                if m["inner"]:
                    raise LayerSpecError(f"{item!r}: '.index' picks a transformer depth inside a UNet block; "
                                         f"{FAMILY_NAMES[layout.family]} blocks have none. Write '{group}:{blk}'.")
                keys = [(group, blk, None)]
            for key in keys:
                if key in selected:
                    prev = selected[key]
                    selected[key] = None if prev is None or heads is None else tuple(sorted({*prev, *heads}))
                else:
                    selected[key] = heads
    return selected


def default_spec(layout: AttentionLayout) -> str:
    """Per-family default layers.

    * UNet: the middle block (official PAG for SD1.5 and SDXL, and diffusers' ``"mid"``).
    * SD3 / MMDiT: joint block 13 of 24, the official SD3 PAG layer; on other depths the block at the same
      relative depth.
    * Flux, HunyuanVideo, Qwen-Image, Wan: the block at the middle of the whole double + single stack, the DiT
      analogue of SD3's choice (no published PAG layer for these).
    """
    if layout.family == "unet":
        if "middle" in layout.blocks and layout.blocks["middle"]:
            return "middle:0"
        # a UNet without a middle attention block: the deepest output block that has attention
        last = min(layout.blocks.get("output", {}) or [0])
        return f"output:{last}"
    if layout.family == "mmdit":
        n = layout.extent["joint"]
        return f"joint:{min(n - 1, round(n * 13 / 24))}"
    nd, ns = layout.extent.get("double", 0), layout.extent.get("single", 0)
    mid = (nd + ns) // 2
    return f"double:{mid}" if mid < nd else f"single:{mid - nd}"
