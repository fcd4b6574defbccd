"""Per-chunk feature store: cached tensors are kept per conditioning stream, never per model call.

ComfyUI batches several conds into one model call (positive, negative, and extra conds that other patches
add, such as a perturbed-attention copy of the positive) and may split them over several calls when memory
is short. ``transformer_options["uuids"]`` names each equal-size chunk of the batch. A cache keyed by the
call would mix streams as soon as the batching changes; one that adds every stream's residual to the whole
batch (core EasyCache) erases the difference between cond and uncond, so guidance vanishes on cached steps.
Here every chunk is stored under its own key and a cached tensor for a call is assembled from the keys of
the chunks present, in their current order.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import torch

ChunkKey = tuple[Hashable, Hashable]


def chunk_keys(transformer_options: dict, batch: int) -> list[ChunkKey]:
    """One key per chunk of the batch: (uuid, marker).

    A chunk listed in ``transformer_options["preprint_perturbed"]`` (a guidance pass with a perturbed network
    or input riding in the same call) is its own stream even if it shared a uuid with an unperturbed one. The
    entry is a collection of chunk positions (marker True), or a mapping position -> marker when several kinds
    of perturbed pass must also be kept apart from one another.
    """
    uuids = transformer_options.get("uuids") or []
    if not uuids or batch % len(uuids) != 0:
        return _per_tile(transformer_options, [("__whole_batch__", False)])
    perturbed = transformer_options.get("preprint_perturbed") or ()
    if isinstance(perturbed, Mapping):
        return _per_tile(transformer_options, [(u, perturbed.get(i, False)) for i, u in enumerate(uuids)])
    return _per_tile(transformer_options, [(u, i in perturbed) for i, u in enumerate(uuids)])


TILES = "preprint_tiles"  # set by Tiled Diffusion on each tile's call: (tiles in the call, latent height, width)


def _per_tile(transformer_options: dict, keys: list[ChunkKey]) -> list[ChunkKey]:
    """Under Tiled Diffusion a call holds crops at some positions (several tiles side by side along the batch, the
    chunks of each tile in turn): every tile position is its own stream, so a cache compares a tile with the same
    tile at the previous step, never with its neighbour."""
    info = transformer_options.get(TILES)
    if not info or not info[0] or len(keys) % len(info[0]) != 0:
        return keys
    tiles, per = info[0], len(keys) // len(info[0])
    return [((u, tuple(tiles[i // per])), m) for i, (u, m) in enumerate(keys)]


def split_chunks(t: torch.Tensor, n: int) -> list[torch.Tensor]:
    return list(t.chunk(n, dim=0)) if n > 1 else [t]


class ChunkStore:
    """Named tensors per chunk key, with a shape / dtype / device check on every read."""

    def __init__(self):
        self._data: dict[tuple[Hashable, ChunkKey], torch.Tensor] = {}
        self._tags: dict[tuple[Hashable, ChunkKey], Hashable] = {}

    def clear(self) -> None:
        self._data.clear()
        self._tags.clear()

    def __len__(self) -> int:
        return len(self._data)

    def put(self, name: Hashable, keys: Sequence[ChunkKey], t: torch.Tensor, tag: Hashable = None) -> None:
        """Store ``t`` split into one entry per chunk; ``tag`` describes the call's input (shape, dtype) so
        that an entry made for another resolution or dtype is never read back."""
        # Detached copies: callers may later modify the batch tensor in place (ControlNet adds, patches).
        for k, part in zip(keys, split_chunks(t, len(keys)), strict=True):
            self._data[(name, k)] = part.detach().clone()
            self._tags[(name, k)] = tag

    def has(self, name: Hashable, keys: Sequence[ChunkKey], tag: Hashable = None, like: torch.Size | None = None,
            dtype: torch.dtype | None = None, device: torch.device | None = None) -> bool:
        """True when every chunk has an entry made with ``tag`` and matching ``like`` (the shape of one chunk),
        dtype and device."""
        for k in keys:
            t = self._data.get((name, k))
            if t is None or self._tags.get((name, k)) != tag:
                return False
            if like is not None and t.shape != like:
                return False
            if dtype is not None and t.dtype != dtype:
                return False
            if device is not None and t.device != device:
                return False
        return True

    def get_chunk(self, name: Hashable, key: ChunkKey) -> torch.Tensor | None:
        return self._data.get((name, key))

    def get(self, name: Hashable, keys: Sequence[ChunkKey]) -> torch.Tensor:
        parts = [self._data[(name, k)] for k in keys]
        return parts[0].clone() if len(parts) == 1 else torch.cat(parts, dim=0)


# How a call's input relates to the reference call of its stream (see ReferenceInputs).
NEW, SAME, OTHER = "new", "same", "other"


class ReferenceInputs:
    """Per stream, the input of the *reference* call at the noise level the stream is at: the first call there.

    Several calls can share a noise level: Heun's corrector and the next step's first call, a self-attention
    guidance pass on a degraded input, restart samplers, noise-refinement passes at sigma_max. Features stored
    at a noise level are valid only for the input they were computed from, so a cache must know whether a call
    repeats that input, brings another one, or moves to a new noise level.
    """

    def __init__(self):
        self._ref: dict[ChunkKey, tuple[float, torch.Tensor]] = {}

    def classify(self, keys: Sequence[ChunkKey], x: torch.Tensor, position: float) -> dict[ChunkKey, str]:
        """NEW (another position: this call becomes the reference), SAME (the reference's position and input)
        or OTHER (the reference's position, another input), per chunk."""
        kinds: dict[ChunkKey, str] = {}
        for k, part in zip(keys, split_chunks(x, len(keys)), strict=True):
            ref = self._ref.get(k)
            if ref is None or ref[0] != position:
                # forward to a new noise level, or back up to a higher one (a restart): a new reference
                self._ref[k] = (position, part.detach().clone())
                kinds[k] = NEW
            elif _same_tensor(ref[1], part):
                kinds[k] = SAME
            else:
                kinds[k] = OTHER
        return kinds

    def clear(self) -> None:
        self._ref.clear()


def _same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and a.device == b.device and torch.equal(a, b)
