"""Multi-resolution methods on the trained toys (trained at 128x128): repetition and adherence at 2x and 4x
their training size, and wall-time ratios, in one process. SD1.5-layout toy: HiDiffusion, attention entropy
scaling, core Deep Shrink, Tiled Diffusion and the two-stage pipelines; Flux-layout toy (2x, Euler simple,
CFG 4): RoPE scaling, entropy scaling, Tiled Diffusion and the two-stage pipelines.

Prompts: one object (7 colours, the shape cycling, in the centre) and two objects (6 pairs with relations);
20 steps DPM++ 2M Karras, CFG 5, seeds 0 and 1 (4x: seed 0 and the first 6 prompts). Methods:

* plain generation at the target size;
* HiDiffusion (Preprint) at the paper's preset for the scale (2x: t1 0.4, t2 0; 4x: t1 0.7, t2 0.3), both
  parts, RAU-Net only and MSW-MSA only;
* core Deep Shrink (PatchModelAddDownscale: block 3, factor = scale, until 35% of the run; its defaults);
* Tiled Diffusion with tiles of the training size (128 px; overlap 32 px, Gaussian weights), both modes;
* two-stage pipelines from the same first stage at 128 px (see ``TwoStage``): plain img2img of the bicubic-upscaled
  latent (20 steps from half way, white noise), the same re-noised with Block Noise, DiffuseHigh (pixel upscale,
  unsharp mask, encode; wavelet low-band guidance for the first third), FAM frequency modulation (c 0.5, full
  second run). Their wall time includes the first stage.

Repetition: objects of the asked colours found minus asked (``proving.metrics.repetition_count``), mean per
image, and the share of images with any excess object. Wall time: every method's runs interleaved with plain
runs at the same size; ratio = plain / method.

Run: .venv/bin/python benchmarks/highres_proving.py [2] [4] [flux] [--few]   (--few: 4 prompts, seed 0, the main
methods only; writes benchmarks/results/highres_proving.{json,md}
and highres_proving_<scale>.png: one row per method, one image per prompt)
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
sys.path.insert(0, str(ROOT / "benchmarks"))
from proving_ground import boot, contact_sheet, mean_adherence  # noqa: E402

log = logging.getLogger("preprint.bench")
COLOURS = ("red", "green", "blue", "yellow", "purple", "cyan", "orange")
SHAPES = ("circle", "square", "triangle")
PAIRS = [("red", "circle", "above", "blue", "square"), ("green", "triangle", "to the left of", "yellow", "circle"),
         ("purple", "square", "below", "cyan", "triangle"), ("orange", "circle", "to the right of", "green", "square"),
         ("blue", "triangle", "above", "red", "circle"), ("yellow", "square", "to the left of", "purple", "triangle")]


def prompts() -> list[str]:
    single = [f"a {c} {SHAPES[i % 3]} in the centre on a white background" for i, c in enumerate(COLOURS)]
    pair = [f"a {a} {sa} {rel} a {b} {sb} on a white background" for a, sa, rel, b, sb in PAIRS]
    return single + pair


def repetition(images: torch.Tensor, texts: list[str], per_prompt: int) -> dict:
    from preprint.proving.metrics import repetition_count
    from preprint.proving.scenes import parse_caption

    reps = [repetition_count(images[i], parse_caption(texts[i // per_prompt])) for i in range(images.shape[0])]
    return {"excess_per_image": round(sum(r.excess for r in reps) / len(reps), 3),
            "images_with_repeats": round(sum(r.excess > 0 for r in reps) / len(reps), 3)}


def methods(scale: int, arch: str) -> dict:
    from comfy_extras.nodes_model_downscale import PatchModelAddDownscale

    from preprint.nodes.highres import (
        PRESETS,
        PreprintAttentionEntropyScaling,
        PreprintHiDiffusion,
        PreprintRoPEScaling,
    )

    t1, t2 = PRESETS["2x" if scale == 2 else "4x"]

    def hd(raunet, msw):
        return lambda m: PreprintHiDiffusion.execute(m, raunet, msw, t1, t2)[0]

    def deep_shrink(m):
        out = PatchModelAddDownscale.execute(m, 3, float(scale), 0.0, 0.35, True, "bicubic", "bicubic")
        return out.result[0] if hasattr(out, "result") else out[0]

    def entropy(m):
        return PreprintAttentionEntropyScaling.execute(m, 128, 128)[0]

    def rope(mode):
        return lambda m: PreprintRoPEScaling.execute(m, mode, 128, 128)[0]

    two_stage = {f"two-stage {k}": TwoStage(k) for k in TWO_STAGE}
    from preprint.highres.tiling import MODES
    from preprint.nodes.tiling import PreprintTiledDiffusion

    def tiled(mode):  # tiles of the training size; overlap a quarter tile
        return lambda m: PreprintTiledDiffusion.execute(m, 128, 128, mode, 32, "gaussian", 1)[0]

    tiles = {f"Tiled Diffusion ({mode}, 128 px)": tiled(mode) for mode in MODES}
    if arch == "flux":
        return {"plain": lambda m: m, "RoPE NTK-aware": rope("NTK-aware"),
                "RoPE position interpolation": rope("position interpolation"), "attention entropy scaling": entropy,
                "RoPE NTK-aware + entropy scaling": lambda m: entropy(rope("NTK-aware")(m)), **tiles, **two_stage}
    return {"plain": lambda m: m, f"HiDiffusion (t1 {t1}, t2 {t2})": hd(True, True), "RAU-Net only": hd(True, False),
            "MSW-MSA only": hd(False, True), "attention entropy scaling": entropy, "core Deep Shrink": deep_shrink,
            **tiles, **two_stage}


QUICK_ONLY: set[str] = set()  # method-name prefixes kept by --quick
SECOND_STEPS, SECOND_DENOISE = 20, 0.5  # every two-stage method re-noises the upscaled first stage the same way


class TwoStage:
    """A first stage at the training size (cached per prompt and seed), upscaled ``scale`` times, then a second
    pass at the large size: ``kind`` is "img2img" (latent upscaled bicubic, white noise, denoise 0.5), "block
    noise" (the same re-noised with Block Noise of the scale's block size), "DiffuseHigh" (decoded, upscaled
    bicubic, sharpened, encoded; its low band guides the first third of the second pass) or "FAM" (frequency
    modulation towards the upsampled first-stage latent, a full second run from noise)."""

    first: dict = {}

    def __init__(self, kind: str):
        self.kind = kind

    def __call__(self, model, clip, vae, text, seed, scale, cfg, sampler, scheduler):
        import comfy.sample
        import comfy.utils
        from comfy_extras.nodes_post_processing import Sharpen

        from preprint.highres.block_noise import BlockNoiseSource
        from preprint.nodes.frequency_guidance import PreprintDiffuseHigh, PreprintFAMFrequency
        from preprint.proving.models import encode
        from preprint.proving.scenes import from_comfy_image

        pos, neg = encode(clip, text), encode(clip, "")
        key = (id(model), text, seed)
        if key not in TwoStage.first:
            z = torch.zeros(1, vae.latent_channels, 16, 16)
            TwoStage.first[key] = comfy.sample.sample(model, comfy.sample.prepare_noise(z, seed), 20, cfg, sampler,
                                                      scheduler, pos, neg, z, seed=seed, disable_pbar=True)
        low = TwoStage.first[key]
        big = comfy.utils.common_upscale(low, low.shape[-1] * scale, low.shape[-2] * scale, "bicubic", "disabled")
        noise = comfy.sample.prepare_noise(big, seed + 1)
        denoise, m, start = SECOND_DENOISE, model, big
        if self.kind == "block noise":
            noise = BlockNoiseSource(seed + 1, scale, 1.0).generate_noise({"samples": big})
        elif self.kind == "DiffuseHigh":
            pixels = vae.decode(low)
            up = comfy.utils.common_upscale(pixels.movedim(-1, 1), pixels.shape[2] * scale, pixels.shape[1] * scale,
                                            "bicubic", "disabled").movedim(1, -1).clamp(0, 1)
            sharp = Sharpen.execute(up, 1, 1.0, 0.1)
            sharp = sharp.result[0] if hasattr(sharp, "result") else sharp[0]
            start = vae.encode(sharp)
            m = PreprintDiffuseHigh.execute(model, {"samples": start}, 0.333, "db4")[0]
        elif self.kind == "FAM":
            m, denoise = PreprintFAMFrequency.execute(model, {"samples": big}, 0.5)[0], 1.0
        with torch.no_grad():
            out = comfy.sample.sample(m, noise, SECOND_STEPS, cfg, sampler, scheduler, pos, neg, start,
                                      denoise=denoise, seed=seed + 1, disable_pbar=True)
            return from_comfy_image(vae.decode(out)).clamp(0, 1)


TWO_STAGE = ("img2img", "block noise", "DiffuseHigh", "FAM")


def run_scale(model, clip, vae, scale: int, texts: list[str], seeds: tuple[int, ...], arch: str = "sd15"):
    from preprint.proving.models import generate

    size = 128 * scale
    rows, sheet = [], []
    variants = {k: v for k, v in methods(scale, arch).items()
                if not QUICK_ONLY or any(k.startswith(p) for p in QUICK_ONLY)}
    kw = {} if arch == "sd15" else {"cfg": 4.0, "sampler": "euler", "scheduler": "simple"}
    timed = {name: 0.0 for name in variants}
    images = {name: [] for name in variants}
    for text in texts:
        for seed in seeds:
            order = list(variants.items())
            if (len(images["plain"]) % 2) == 1:
                order.reverse()
            for name, make in order:
                t0 = time.perf_counter()
                if isinstance(make, TwoStage):
                    s = {"cfg": 5.0, "sampler": "dpmpp_2m", "scheduler": "karras", **kw}
                    images[name].append(make(model, clip, vae, text, seed, scale, s["cfg"], s["sampler"],
                                             s["scheduler"]))
                else:
                    images[name].append(generate(make(model), clip, vae, [text], seeds=(seed,), steps=20,
                                                 **{"cfg": 5.0, **kw}, width=size, height=size))
                timed[name] += time.perf_counter() - t0
    plain_time = timed["plain"]
    for name in variants:
        imgs = torch.cat(images[name])
        adh = mean_adherence(imgs, texts, len(seeds))
        rows.append({"toy": arch, "scale": f"{scale}x ({size}px)", "method": name, "images": imgs.shape[0],
                     **repetition(imgs, texts, len(seeds)), "adherence": adh["overall"], "colour": adh["colour"],
                     "speed_vs_plain": round(plain_time / timed[name], 3)})
        sheet.append(imgs[:: len(seeds)][:8])
        log.info("%s", rows[-1])
    return rows, torch.cat(sheet)


def write(results: dict) -> None:
    """Merge this run's sections into the results file (rows keyed by toy, scale and method) and redraw the table,
    so sections run in separate processes (``2``, ``4``, ``flux``) add up."""
    path = RESULTS / "highres_proving.json"
    old = json.loads(path.read_text()) if path.exists() else {}
    new_keys = {(r["toy"], r["scale"]) for r in results["rows"]}
    rows = [r for r in old.get("rows", []) if (r["toy"], r["scale"]) not in new_keys] + results["rows"]
    merged = {**old, **results, "rows": rows}
    path.write_text(json.dumps(merged, indent=1) + "\n")
    lines = ["# Multi-resolution on the trained toys (trained at 128x128)", "",
             "Run: `.venv/bin/python benchmarks/highres_proving.py [2] [4] [flux]` (see its docstring for prompts and "
             "settings).", "",
             f"SD1.5 toy at 128x128 (training size): {json.dumps(merged.get('native_128'))}", "",
             "Rows marked --few ran `--few` (4 prompts, seed 0, the main methods) on a busy machine.", "",
             "| toy | scale | method | images | excess objects / image | images with repeats | adherence | colour "
             "| speed vs plain |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        scale = f"{r['scale']} (--few)" if r.get("few") else r["scale"]
        lines.append(f"| {r['toy']} | {scale} | {r['method']} | {r.get('images', '')} | {r['excess_per_image']} | "
                     f"{r['images_with_repeats']} | {r['adherence']} | {r['colour']} | {r['speed_vs_plain']}x |")
    (RESULTS / "highres_proving.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main():
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    boot()
    from preprint.proving.models import generate, load_toy

    model, clip, vae = load_toy("sd15")
    texts = prompts()
    quick = "--few" in sys.argv  # a first look on a busy machine: 4 prompts, one seed, the main methods
    seeds = (0,) if quick else (0, 1)
    if quick:
        texts = [texts[0], texts[3], texts[7], texts[9]]
        QUICK_ONLY.update({"plain", "HiDiffusion", "core Deep Shrink", "Tiled Diffusion", "two-stage"})
    native = generate(model, clip, vae, texts, seeds=seeds, steps=20, cfg=5.0)
    results = {"native_128_few" if quick else "native_128": {**repetition(native, texts, len(seeds)),
                              "adherence": mean_adherence(native, texts, len(seeds))["overall"],
                              "prompts": len(texts), "seeds": len(seeds)},
               "rows": []}
    only = {a for a in sys.argv[1:] if not a.startswith("--")} or {"2", "4", "flux"}
    if "2" in only:
        r, sheet = run_scale(model, clip, vae, 2, texts, seeds)
        results["rows"] += r
        contact_sheet(sheet, RESULTS / "highres_proving_2x.png", columns=8)
        write(results)
    if "4" in only:
        r, sheet = run_scale(model, clip, vae, 4, texts[:6], (0,))
        results["rows"] += [{**row, "few": quick} for row in r]
        contact_sheet(sheet, RESULTS / "highres_proving_4x.png", columns=6)
        write(results)
    if "flux" in only:
        fmodel, fclip, fvae = load_toy("flux")
        r, sheet = run_scale(fmodel, fclip, fvae, 2, texts, seeds, arch="flux")
        results["rows"] += [{**row, "few": quick} for row in r]
        contact_sheet(sheet, RESULTS / "highres_proving_flux_2x.png", columns=8)
        write(results)


if __name__ == "__main__":
    main()
