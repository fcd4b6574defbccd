"""Host-tier helpers: tiny models, conditioning, sampling through ComfyUI, model-call counting.

Everything here runs real ComfyUI code in-process; nothing is mocked. Import only inside host tests (the
conftest boots ComfyUI before any test module imports ``comfy``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import comfy.patcher_extension
import comfy.sample
import comfy.samplers
import torch

from preprint.runner.tiny_models import latent_channels, tiny_conds, tiny_model

__all__ = ["tiny_model", "tiny_conds", "make_conds", "make_latent", "make_noise", "run_sampling",
           "run_custom_sampling", "CallCounter", "count_calls", "node_class", "run_node"]


def make_conds(family: str, seed: int = 1, batch: int = 1) -> tuple[list, list]:
    return tiny_conds(family, seed=seed, batch=batch)


def make_latent(family: str, batch: int = 1, height: int = 8, width: int = 8) -> torch.Tensor:
    return torch.zeros(batch, latent_channels(family), height, width)


def make_noise(latent: torch.Tensor, seed: int = 0) -> torch.Tensor:
    return comfy.sample.prepare_noise(latent, seed)


def run_sampling(model, family: str, sampler_name: str = "euler", scheduler: str = "karras", steps: int = 6,
                 cfg: float = 5.0, seed: int = 0, batch: int = 1, height: int = 8, width: int = 8,
                 positive=None, negative=None, denoise: float = 1.0) -> torch.Tensor:
    """Sample like the stock KSampler node does (comfy.sample.sample), on a tiny model."""
    latent = make_latent(family, batch, height, width)
    noise = make_noise(latent, seed)
    if positive is None or negative is None:
        positive, negative = make_conds(family, batch=1)
    return comfy.sample.sample(model, noise, steps, cfg, sampler_name, scheduler, positive, negative, latent,
                               denoise=denoise, seed=seed, disable_pbar=True)


def run_custom_sampling(model, family: str, sampler, sigmas: torch.Tensor, cfg: float = 5.0, seed: int = 0,
                        batch: int = 1, height: int = 8, width: int = 8, positive=None, negative=None,
                        guider=None) -> torch.Tensor:
    """Sample like SamplerCustomAdvanced with a CFGGuider (or the given guider)."""
    latent = make_latent(family, batch, height, width)
    noise = make_noise(latent, seed)
    if guider is None:
        if positive is None or negative is None:
            positive, negative = make_conds(family, batch=1)
        guider = comfy.samplers.CFGGuider(model)
        guider.set_conds(positive, negative)
        guider.set_cfg(cfg)
    return guider.sample(noise, latent, sampler, sigmas, seed=seed, disable_pbar=True)


@dataclass
class CallCounter:
    """Counts diffusion-model forward calls and the batch size (rows) of each."""

    calls: int = 0
    rows: list[int] = field(default_factory=list)
    chunks: list[list[int]] = field(default_factory=list)

    def wrapper(self, executor, *args, **kwargs):
        x = args[0]
        self.calls += 1
        self.rows.append(int(x.shape[0]))
        # ComfyUI's BaseModel.apply_model passes transformer_options by keyword to every architecture
        topts = kwargs.get("transformer_options") or {}
        self.chunks.append(list(topts.get("cond_or_uncond", [])))
        return executor(*args, **kwargs)


@contextlib.contextmanager
def count_calls(model) -> Iterator[CallCounter]:
    """Count forward calls of ``model`` (a ModelPatcher) through a DIFFUSION_MODEL wrapper on a clone.

    Yields the counter; sample with ``counter.model`` so the original model is not touched.
    """
    yield counted(model)


def counted(model) -> CallCounter:
    """A call counter whose ``.model`` is a clone of ``model`` with the counting wrapper installed."""
    counter = CallCounter()
    patched = model.clone()
    patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, "preprint_test_counter",
                                 counter.wrapper)
    counter.model = patched  # type: ignore[attr-defined]
    return counter


def node_class(node_id: str):
    import nodes

    if node_id not in nodes.NODE_CLASS_MAPPINGS:
        raise KeyError(f"node {node_id!r} is not registered with ComfyUI")
    return nodes.NODE_CLASS_MAPPINGS[node_id]


def run_node(node_id: str, **inputs):
    """Execute a V3 node's ``execute`` directly (after ComfyUI loaded it) and return its result tuple."""
    cls = node_class(node_id)
    out = cls.execute(**inputs)
    return tuple(out.result) if hasattr(out, "result") else out
