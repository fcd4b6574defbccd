"""Caching speed benchmark: wall-time speedup, block compute skipped and output drift, in one process.

Models (random weights, so the images are noise; the *architecture* and hence the cost structure is real):
- the SD1.5 UNet at full width (comfy.supported_models.SD15 unet_config: 320 channels, context 768, 8 heads,
  the standard 4-level layout), 32x32 latent, 20 Euler steps (Karras), CFG 1 (one stream per step);
- a Flux-shaped DiT (double then single stream blocks, guidance embedding) at hidden size 256, 32x32 latent,
  20 steps, CFG 1.

Compared on the same noise: uncached; Preprint DeepCache (interval 3 and 5), Block Cache (online),
Encoder Propagation, DiT Block Cache (AB-2 and plain reuse); core EasyCache. "Block compute skipped" weights
each block by its measured time in the uncached run (EasyCache skips whole forward passes). Drift is
||out - uncached|| / ||uncached|| on the final latent. Timings are single runs on a shared CPU: treat ratios
as approximate.

Run: .venv/bin/python benchmarks/caching_speed.py  (writes benchmarks/results/caching_speed.{json,md})
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
log = logging.getLogger("preprint.bench")


def boot():
    from preprint.runner import comfy_host as ch

    path = ch.find_comfyui()
    if path is None:
        sys.exit("caching benchmark: " + ch.why_not_found())
    return ch.boot(path)


def sd15_full():
    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models

    from preprint.runner.tiny_models import _sd15_config, randomise_

    cfg = {**_sd15_config(), **comfy.supported_models.SD15.unet_config, "num_heads": 8, "num_head_channels": -1}
    config = comfy.supported_models.SD15(cfg)
    config.set_inference_dtype(torch.float32, None)
    model = config.get_model({}, device=torch.device("cpu"))
    randomise_(model.diffusion_model, 0)
    return comfy.model_patcher.ModelPatcher(model, load_device=comfy.model_management.get_torch_device(),
                                            offload_device=comfy.model_management.unet_offload_device())


def flux_small():
    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models

    from preprint.runner.tiny_models import _flux_config, randomise_

    cfg = {**_flux_config(), "hidden_size": 256, "num_heads": 4, "depth": 4, "depth_single_blocks": 8,
           "axes_dim": [16, 24, 24], "context_in_dim": 64}
    config = comfy.supported_models.Flux(cfg)
    config.set_inference_dtype(torch.float32, None)
    model = config.get_model({}, device=torch.device("cpu"))
    randomise_(model.diffusion_model, 0)
    return comfy.model_patcher.ModelPatcher(model, load_device=comfy.model_management.get_torch_device(),
                                            offload_device=comfy.model_management.unet_offload_device())


def conds(context_dim, pooled_dim=None, flux=False):
    g = torch.Generator().manual_seed(1)

    def one():
        extra = {}
        if pooled_dim:
            extra["pooled_output"] = torch.randn(1, pooled_dim, generator=g)
        if flux:
            extra["guidance"] = 3.5
        return [[torch.randn(1, 77 if not flux else 16, context_dim, generator=g), extra]]

    return one(), one()


class Counter:
    """Innermost DIFFUSION_MODEL wrapper: counts forward passes that really reach the network."""

    def __init__(self):
        self.calls = 0

    def __call__(self, executor, *args, **kwargs):
        self.calls += 1
        return executor(*args, **kwargs)


def block_timer(model, family):
    """Forward hooks timing each block (name -> seconds) during an uncached run."""
    dm = model.model.diffusion_model
    mods = {}
    if family == "sd15":
        mods.update({("input", i): m for i, m in enumerate(dm.input_blocks)})
        mods[("middle", 0)] = dm.middle_block
        mods.update({("output", i): m for i, m in enumerate(dm.output_blocks)})
    else:
        mods.update({("double_block", i): m for i, m in enumerate(dm.double_blocks)})
        mods.update({("single_block", i): m for i, m in enumerate(dm.single_blocks)})
    cost: dict = {}
    start: dict = {}
    handles = []
    # ComfyUI runs a UNet block by iterating its layers (forward_timestep_embed), never through the block's own
    # __call__: time the layers and charge them to their block
    for name, m in mods.items():
        layers = list(m.children()) if family == "sd15" else [m]
        for layer in layers:
            handles.append(layer.register_forward_pre_hook(
                lambda _m, _a, n=name: start.__setitem__(n, time.perf_counter())))
            handles.append(layer.register_forward_hook(
                lambda _m, _a, _o, n=name: cost.__setitem__(n, cost.get(n, 0.0) + time.perf_counter() - start[n])))
    return cost, handles


def sample(model, family, positive, negative, steps=20, seed=0):
    import comfy.sample

    ch = 4 if family == "sd15" else 16
    latent = torch.zeros(1, ch, 32, 32)
    noise = comfy.sample.prepare_noise(latent, seed)
    t0 = time.perf_counter()
    out = comfy.sample.sample(model, noise, steps, 1.0, "euler", "karras" if family == "sd15" else "simple",
                              positive, negative, latent, seed=seed, disable_pbar=True)
    return out, time.perf_counter() - t0


def bench_family(family, model, variants, positive, negative):
    import comfy.patcher_extension as pe

    rows = []
    # warm-up (allocator, lazy init) on a 2-step run
    sample(model, family, positive, negative, steps=2)
    cost, handles = block_timer(model, family)
    base, _ = sample(model, family, positive, negative)  # per-block costs; hooks slow this run, so not timed
    for h in handles:
        h.remove()
    _, t_base = sample(model, family, positive, negative)
    total_cost = sum(cost.values())
    rows.append({"model": family, "method": "uncached", "seconds": t_base, "speedup": 1.0,
                 "block_compute_skipped": 0.0, "block_evaluations_skipped": 0.0, "compute_bound_speedup": 1.0,
                 "forward_passes": 20, "drift": 0.0})
    for label, make, key in variants:
        m = make(model)
        counter = Counter()
        m.add_wrapper_with_key(pe.WrappersMP.DIFFUSION_MODEL, "bench_counter", counter)
        out, t = sample(m, family, positive, negative)
        drift = ((out - base).norm() / base.norm()).item()
        if key is None:  # core EasyCache: whole passes skipped
            skipped = 1.0 - counter.calls / 20
        else:
            rep = m.get_wrappers(pe.WrappersMP.OUTER_SAMPLE, key)[0].last_report
            skipped = rep["counts"].skipped_fraction({n: c for n, c in cost.items()}) if total_cost else 0.0
        evals = skipped if key is None else rep["counts"].skipped_fraction()
        rows.append({"model": family, "method": label, "seconds": t, "speedup": t_base / t,
                     "block_compute_skipped": skipped, "block_evaluations_skipped": evals,
                     "compute_bound_speedup": 1.0 / max(1e-9, 1.0 - skipped),
                     "forward_passes": counter.calls, "drift": drift})
        log.info("%s %-34s %6.1fs  x%.2f  skipped %.0f%%  drift %.3f", family, label, t, t_base / t,
                 100 * skipped, drift)
    # time the uncached model again after the variants: the baseline is the faster of the two runs, and the
    # spread between them shows how steady the machine was
    _, t_again = sample(model, family, positive, negative)
    rows[0]["seconds_repeat"] = t_again
    if t_again < t_base:
        for r in rows[1:]:
            r["speedup"] = r["speedup"] * t_again / t_base
        rows[0]["seconds"] = t_again
    return rows


def main():
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    boot()
    torch.manual_seed(0)
    from comfy_extras.nodes_easycache import EasyCacheNode

    from preprint.nodes.caching import (  # noqa: F401  (the pack's node classes, imported as a package)
        PreprintBlockCache,
        PreprintDeepCache,
        PreprintDiTBlockCache,
        PreprintEncoderPropagation,
    )

    win = {"start_percent": 0.0, "end_percent": 1.0}

    def dc(interval, schedule="uniform"):
        return lambda m: PreprintDeepCache.execute(m, interval, 0, schedule, **win)[0]

    def easy(th):
        return lambda m: EasyCacheNode.execute(m, reuse_threshold=th, start_percent=0.15, end_percent=0.95,
                                               verbose=False)[0]

    sd_variants = [
        ("DeepCache N=3 (uniform, branch 0)", dc(3), "preprint_deepcache"),
        ("DeepCache N=5 (uniform, branch 0)", dc(5), "preprint_deepcache"),
        ("Block Cache online th=0.3", lambda m: PreprintBlockCache.execute(m, "online", 0.3, "x", **win)[0],
         "preprint_blockcache"),
        ("Encoder propagation (paper keys)",
         lambda m: PreprintEncoderPropagation.execute(m, "non-uniform", 2, **win)[0], "preprint_encoder_propagation"),
        ("core EasyCache th=0.2", easy(0.2), None),
    ]
    flux_variants = [
        ("DiT cache th=0.3 AB-2", lambda m: PreprintDiTBlockCache.execute(m, 0.3, 2, 3, **win)[0],
         "preprint_dit_cache"),
        ("DiT cache th=0.3 reuse (order 1)", lambda m: PreprintDiTBlockCache.execute(m, 0.3, 1, 3, **win)[0],
         "preprint_dit_cache"),
        ("core EasyCache th=0.2", easy(0.2), None),
    ]
    rows = []
    only = set(sys.argv[1:]) or {"sd15", "flux"}
    if "sd15" in only:
        rows += bench_family("sd15", sd15_full(), sd_variants, *conds(768))
    if "flux" in only:
        rows += bench_family("flux", flux_small(), flux_variants, *conds(64, 32, flux=True))

    suffix = "" if only == {"sd15", "flux"} else "_" + "_".join(sorted(only))
    RESULTS.mkdir(parents=True, exist_ok=True)
    meta = {"torch_threads": torch.get_num_threads(), "latent": "32x32", "steps": 20, "sampler": "euler", "cfg": 1.0,
            "sd15": "full-width SD1.5 UNet, random weights", "flux": "Flux layout, hidden 256, 4 double + 8 single"}
    (RESULTS / f"caching_speed{suffix}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = ["| model | method | seconds | wall speedup | block compute skipped | 1/(1-skipped) | forward passes "
             "| drift |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['method']} | {r['seconds']:.1f} | {r['speedup']:.2f}x | "
                     f"{100 * r['block_compute_skipped']:.0f}% | {r['compute_bound_speedup']:.2f}x | "
                     f"{r['forward_passes']} | {r['drift']:.4f} |")
    (RESULTS / f"caching_speed{suffix}.md").write_text(
        "# Caching speed (CPU, one run each)\n\n" + json.dumps(meta) + "\n\n" + "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
