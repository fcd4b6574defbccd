"""Convert the annealing-guidance authors' checkpoint into a Preprint scheduler file (safetensors).

Yehezkel et al., "Navigating with Annealing Guidance Scale in Diffusion Space", arXiv:2506.24108. The
authors publish ``src/model/checkpoints/checkpoint.pt`` in github.com/annealing-guidance/annealing-guidance:
a dictionary with the training configuration (``config``, whose ``guidance_scale_model`` entry sizes the
MLP) and the MLP weights (``guidance_scale_model``).

Usage (with ComfyUI's Python; the script finds its pack by its own location)::

    python ComfyUI/custom_nodes/<this pack>/guidance/annealing_convert.py checkpoint.pt \\
        ComfyUI/models/guidance_schedulers/annealing_sdxl.safetensors

or, where the pack is installed as a package, ``python -m preprint.guidance.annealing_convert ...``.

The checkpoint is read with ``torch.load(weights_only=True)``: only tensors and plain containers are
accepted, never arbitrary pickled objects, so a tampered file cannot run code. Only the scheduler's weights
and its size configuration are written out.
"""

from __future__ import annotations

if __name__ == "__main__" and not __package__:  # run as a file: load the pack as ``preprint`` first
    import importlib.util
    import sys
    from pathlib import Path

    _root = Path(__file__).resolve().parents[1]
    _spec = importlib.util.spec_from_file_location("preprint", _root / "__init__.py",
                                                   submodule_search_locations=[str(_root)])
    sys.modules["preprint"] = _pack = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(_pack)
    from preprint.guidance.annealing_convert import main as _main

    sys.exit(_main())

import argparse
import logging
import sys
from pathlib import Path

import torch

from .annealing import GuidanceScheduler, SchedulerConfig, SchedulerFileError, load_scheduler, save_scheduler

log = logging.getLogger("preprint")

WEIGHTS_KEY = "guidance_scale_model"


def scheduler_from_checkpoint(checkpoint: dict) -> GuidanceScheduler:
    """Build the scheduler from a loaded checkpoint dictionary (validated, clear errors)."""
    if not isinstance(checkpoint, dict):
        raise SchedulerFileError(f"checkpoint is a {type(checkpoint).__name__}, expected a dictionary.")
    weights = checkpoint.get(WEIGHTS_KEY)
    if not isinstance(weights, dict):
        raise SchedulerFileError(
            f"checkpoint has no '{WEIGHTS_KEY}' weight dictionary (keys: {sorted(map(str, checkpoint))}); is this "
            "the annealing-guidance checkpoint.pt?"
        )
    config = checkpoint.get("config", {})
    model_cfg = config.get(WEIGHTS_KEY, {}) if isinstance(config, dict) else {}
    if not isinstance(model_cfg, dict):
        model_cfg = {}
    tensors = {k: v for k, v in weights.items() if isinstance(v, torch.Tensor)}
    if not model_cfg:
        model_cfg = infer_config(tensors)
        log.warning("checkpoint has no MLP configuration; inferred %s from the weight shapes", model_cfg)
    return GuidanceScheduler(SchedulerConfig.from_dict(model_cfg), tensors)


def infer_config(tensors: dict[str, torch.Tensor]) -> dict:
    """Sizes from the weight shapes, for checkpoints saved without their configuration."""
    idx = sorted(int(k.split(".")[1]) for k in tensors if k.startswith("combined_head.") and k.endswith(".weight"))
    if len(idx) < 2:
        raise SchedulerFileError("checkpoint weights do not contain a 'combined_head' MLP.")
    first, last = tensors[f"combined_head.{idx[0]}.weight"], tensors[f"combined_head.{idx[-1]}.weight"]
    in_size = int(first.shape[1])
    if in_size % 3:
        raise SchedulerFileError(f"cannot infer embedding sizes from an input width of {in_size}.")
    return {"hidden_size": int(first.shape[0]), "output_size": int(last.shape[0]), "n_layers": len(idx) - 2,
            "t_embed_dim": in_size // 3, "delta_embed_dim": in_size // 3, "lambda_embed_dim": in_size // 3}


def convert(src: str | Path, dst: str | Path) -> GuidanceScheduler:
    src, dst = Path(src), Path(dst)
    if not src.is_file():
        raise SchedulerFileError(f"checkpoint not found: {src}")
    try:
        checkpoint = torch.load(str(src), map_location="cpu", weights_only=True)
    except Exception as e:  # the safe unpickler refuses anything that is not tensors / plain containers
        raise SchedulerFileError(
            f"{src.name} could not be read with the safe loader (tensors and plain containers only): {e}"
        ) from e
    scheduler = scheduler_from_checkpoint(checkpoint)
    dst.parent.mkdir(parents=True, exist_ok=True)
    save_scheduler(scheduler, dst, source=src.name)
    load_scheduler(dst)  # round trip: the written file is usable
    return scheduler


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m preprint.guidance.annealing_convert",
        description="Convert the annealing-guidance checkpoint.pt (arXiv:2506.24108) into a safetensors "
                    "scheduler file for ComfyUI's models/guidance_schedulers folder.",
    )
    parser.add_argument("checkpoint", help="the authors' checkpoint.pt")
    parser.add_argument("output", help="where to write the .safetensors file")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        scheduler = convert(args.checkpoint, args.output)
    except SchedulerFileError as e:
        log.error("%s", e)
        return 1
    log.info("wrote %s (%s)", args.output, scheduler.config)
    return 0


if __name__ == "__main__":
    sys.exit(main())
