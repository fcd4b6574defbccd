"""Per-run bookkeeping shared by the perturbed-attention and SAG hooks (pure Python / torch).

ComfyUI runs one model call per group of equal-size batch chunks and tells every patch which cond list
each chunk came from (``cond_or_uncond``). These helpers turn that into batch rows and hold the state a
sampling run needs between the batched model call and the guidance step.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

import torch

# uuid5 namespace for the perturbed copy of a cond: deterministic, so caches keyed by uuid see the same
# stream every step and every run, and never the original cond's uuid.
PERTURBED_NAMESPACE = uuid.UUID("5d0f3c4e-6a8b-4f2e-9c1d-7b3a2e1f0a91")


def perturbed_uuid(original, stream: str = "") -> uuid.UUID:
    """The uuid of a perturbed copy of the cond whose uuid is ``original``.

    ``stream`` names the technique (empty for PAG): copies of one cond made by different techniques (PAG's
    and SEG's perturbed rows, SAG's degraded pass) must be different streams for a cache keyed by uuid.
    """
    return uuid.uuid5(PERTURBED_NAMESPACE, f"{stream}:{original}" if stream else str(original))


def chunks_of(cond_or_uncond: list[int], cond_index: int) -> list[int]:
    """Chunk positions in this model call that came from cond list ``cond_index``."""
    return [j for j, c in enumerate(cond_or_uncond) if c == cond_index]


def rows_of(chunks: list[int] | set[int], batch: int, n_chunks: int) -> list[int]:
    """Batch rows of the given chunks (ComfyUI concatenates equal-size chunks along the batch)."""
    if n_chunks == 0 or not chunks:
        return []
    if batch % n_chunks:
        raise ValueError(f"batch of {batch} rows cannot hold {n_chunks} equal chunks")
    per = batch // n_chunks
    return [j * per + r for j in sorted(chunks) for r in range(per)]


@dataclass
class Pending:
    """The positive and perturbed predictions of one step, waiting for the guidance hook."""

    x: torch.Tensor
    cond: torch.Tensor
    perturbed: torch.Tensor
    scale: float


@dataclass
class PagRunState:
    """Lives in the run's ``transformer_options`` from OUTER_SAMPLE start to end; never shared between runs."""

    armed_x: torch.Tensor | None = None  # the x of the guider call whose cond batch gets the extra copy
    positive: object = None  # identity of the guider's positive cond list
    pending: Pending | None = None
    perturbed_steps: int = 0


@dataclass
class SagPending:
    x: torch.Tensor
    pred: torch.Tensor  # the guiding prediction (uncond, or cond at cfg 1)
    conds: list
    masks: list[torch.Tensor]
    scale: float


@dataclass
class SagRunState:
    armed_x: torch.Tensor | None = None
    positive: object = None
    negative: object = None
    masks: dict = field(default_factory=dict)  # uuid -> (b, 1, h, w) mask from this step's model call(s)
    # uuid -> the latest mask computed in this run: a block cache that reuses the mask layer's block on a step
    # reuses its attention too, so the mask of the step that computed it is the one that still applies
    last_masks: dict = field(default_factory=dict)
    pending: SagPending | None = None
