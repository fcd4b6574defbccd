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

from collections.abc import Hashable, Sequence

import torch

ChunkKey = tuple[Hashable, bool]


def chunk_keys(transformer_options: dict, batch: int) -> list[ChunkKey]:
    """One key per chunk of the batch: (uuid, perturbed).

    A chunk listed in ``transformer_options["preprint_perturbed"]`` (perturbed-attention guidance riding in
    the same call) is its own stream even if it shared a uuid with an unperturbed one.
    """
    uuids = transformer_options.get("uuids") or []
    if not uuids or batch % len(uuids) != 0:
        return [("__whole_batch__", False)]
    perturbed = transformer_options.get("preprint_perturbed") or ()
    return [(u, i in perturbed) for i, u in enumerate(uuids)]


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
