"""PAG speed benchmark: Preprint PAG (perturbed rows batched into the CFG call) against core
PerturbedAttentionGuidance (a separate model call per step) and against plain CFG, in one process.

Model: the SD1.5 UNet layout (4 levels, 2 res blocks, attention on 3 levels, 8 heads) at width
``--width`` (default 96; real SD1.5 is 320) with random weights, latent ``--size`` (default 48x48, i.e.
384x384 pixels, so the middle block sees 6x6 tokens), Euler, Karras, ``--steps`` steps, CFG 5, PAG scale 3,
middle block, seed 0. Each variant runs ``--repeats`` times, interleaved, and the fastest wall time is kept;
forward calls and batch rows are counted with a DIFFUSION_MODEL wrapper. Optional ``--flux`` adds a small
Flux-shaped DiT (where core PAG perturbs nothing but still pays its pass).

Run: .venv/bin/python benchmarks/pag_speed.py  (writes benchmarks/results/pag_speed.{json,md})
     Add --device cuda to time on a GPU (the default forces ComfyUI's CPU mode).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


def boot(cpu: bool):
    from preprint.runner import comfy_host as ch

    path = ch.find_comfyui()
    if path is None:
        sys.exit("pag benchmark: " + ch.why_not_found())
    return ch.boot(path, cpu=cpu)


def patcher(config):
    import comfy.model_management
    import comfy.model_patcher

    from preprint.runner.tiny_models import randomise_

    config.set_inference_dtype(torch.float32, None)
    model = config.get_model({}, device=torch.device("cpu"))
    randomise_(model.diffusion_model, 0)
    return comfy.model_patcher.ModelPatcher(model, load_device=comfy.model_management.get_torch_device(),
                                            offload_device=comfy.model_management.unet_offload_device())


def sd15_model(width: int):
    import comfy.supported_models

    from preprint.runner.tiny_models import _sd15_config

    cfg = {**_sd15_config(), "model_channels": width, "context_dim": 128, "num_heads": 8, "num_head_channels": -1}
    return patcher(comfy.supported_models.SD15(cfg)), 128, None


def flux_model():
    import comfy.supported_models

    from preprint.runner.tiny_models import _flux_config

    cfg = {**_flux_config(), "hidden_size": 256, "num_heads": 4, "depth": 4, "depth_single_blocks": 8,
           "axes_dim": [16, 24, 24]}
    return patcher(comfy.supported_models.Flux(cfg)), 64, 32


def conds(context_dim: int, pooled: int | None, flux: bool):
    g = torch.Generator().manual_seed(1)

    def one():
        extra: dict = {}
        if pooled:
            extra["pooled_output"] = torch.randn(1, pooled, generator=g)
        if flux:
            extra["guidance"] = 3.5
        return [[torch.randn(1, 77, context_dim, generator=g), extra]]

    return one(), one()


class Counter:
    def __init__(self):
        self.calls, self.rows = 0, 0

    def __call__(self, executor, *args, **kwargs):
        self.calls += 1
        self.rows += int(args[0].shape[0])
        return executor(*args, **kwargs)


def variants(model):
    import comfy.patcher_extension as pe
    from comfy_extras.nodes_pag import PerturbedAttentionGuidance

    import nodes as comfy_nodes  # ComfyUI's nodes module (booted above)

    ours = comfy_nodes.NODE_CLASS_MAPPINGS["PreprintPerturbedAttentionGuidance"]

    def preprint(scale):
        out = ours.execute(model, scale, "", 0.0, -1.0, -1.0, 0.0, "image-to-image")
        return out.result[0]

    core = PerturbedAttentionGuidance.execute(model, 3.0)
    core = core.result[0] if hasattr(core, "result") else core[0]
    out = {"plain CFG": model.clone(), "core PAG": core, "Preprint PAG": preprint(3.0),
           "Preprint PAG, scale 0": preprint(0.0)}
    counters = {}
    for name, m in out.items():
        c = Counter()
        m.add_wrapper_with_key(pe.WrappersMP.DIFFUSION_MODEL, "bench_counter", c)
        counters[name] = c
    return out, counters


def run(model, positive, negative, family: str, steps: int, size: int) -> tuple[torch.Tensor, float]:
    import comfy.sample

    ch = 4 if family == "sd15" else 16
    latent = torch.zeros(1, ch, size, size)
    noise = comfy.sample.prepare_noise(latent, 0)
    t0 = time.perf_counter()
    out = comfy.sample.sample(model, noise, steps, 5.0, "euler", "karras" if family == "sd15" else "simple",
                              positive, negative, latent, seed=0, disable_pbar=True)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, time.perf_counter() - t0


def bench(family: str, model, positive, negative, steps: int, size: int, repeats: int) -> dict:
    models, counters = variants(model)
    for m in models.values():  # warm-up
        run(m, positive, negative, family, 2, size)
    times: dict[str, list[float]] = {n: [] for n in models}
    outs = {}
    for _ in range(repeats):
        for name, m in models.items():
            before = (counters[name].calls, counters[name].rows)
            outs[name], t = run(m, positive, negative, family, steps, size)
            times[name].append(t)
            counters[name].last = (counters[name].calls - before[0], counters[name].rows - before[1])
    # the fastest of the interleaved runs: on a shared CPU, slower runs measure other processes' load
    med = {n: min(v) for n, v in times.items()}
    base = outs["plain CFG"]
    rows = []
    for name in models:
        calls, nrows = counters[name].last
        rows.append({
            "variant": name, "best_s": med[name], "median_s": statistics.median(times[name]), "runs_s": times[name],
            "vs_plain_cfg": med[name] / med["plain CFG"], "vs_core_pag": med[name] / med["core PAG"],
            "forward_calls_per_step": calls / steps, "batch_rows_per_step": nrows / steps,
            "max_abs_diff_vs_plain": float((outs[name] - base).abs().max()),
        })
    return {"family": family, "steps": steps, "latent": [size, size], "repeats": repeats, "rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--size", type=int, default=48)
    ap.add_argument("--width", type=int, default=96)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--flux", action="store_true")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--out", default=str(RESULTS / "pag_speed"))
    a = ap.parse_args()
    boot(cpu=a.device == "cpu")
    torch.manual_seed(0)
    results = []
    m, ctx, pooled = sd15_model(a.width)
    results.append(bench("sd15", m, *conds(ctx, pooled, False), a.steps, a.size, a.repeats))
    if a.flux:
        m, ctx, pooled = flux_model()
        results.append(bench("flux", m, *conds(ctx, pooled, True), a.steps, min(a.size, 32), a.repeats))
    meta = {"device": torch.cuda.get_device_name() if a.device == "cuda" else f"CPU ({platform.processor() or 'x86'})",
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "sd15_width": a.width, "cfg": 5.0, "pag_scale": 3.0, "sampler": "euler", "seed": 0}
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    lines = ["# PAG speed", "",
             f"{meta['device']}, torch {meta['torch']} ({meta['torch_threads']} threads). Fastest of "
             f"{a.repeats} interleaved runs per variant (all runs in the JSON); CFG 5, PAG scale 3 on the default "
             "layers, Euler, seed 0.",
             "Ratios below 1 are faster. Random-weight models: timings only, the images are noise.", ""]
    for r in results:
        desc = (f"SD1.5 layout, width {a.width}" if r["family"] == "sd15"
                else "Flux-shaped DiT, hidden 256, 4+8 blocks")
        lines += [f"## {desc}, latent {r['latent'][0]}x{r['latent'][1]}, {r['steps']} steps", "",
                  "| variant | best s | vs plain CFG | vs core PAG | calls/step | rows/step | max |diff| vs CFG |",
                  "|---|---|---|---|---|---|---|"]
        for row in r["rows"]:
            lines.append(f"| {row['variant']} | {row['best_s']:.2f} | {row['vs_plain_cfg']:.2f} | "
                         f"{row['vs_core_pag']:.2f} | {row['forward_calls_per_step']:.0f} | "
                         f"{row['batch_rows_per_step']:.0f} | {row['max_abs_diff_vs_plain']:.3g} |")
        lines.append("")
    out.with_suffix(".md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
