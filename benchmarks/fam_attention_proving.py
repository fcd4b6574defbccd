"""FAM Diffusion on the trained SD1.5-layout toy (trained at 128x128) at 2x: frequency modulation alone against
frequency + attention modulation, from the same first stage, in one process.

Setting as the FAM rows of ``highres_proving.py``: first stage 20 steps DPM++ 2M Karras, CFG 5 at 128 px; its latent
upscaled bicubic 2x; second pass a full 20-step run from noise at 256 px with FAM Frequency Modulation (c 0.5) towards
it; with attention modulation also on (weight 0.7, default layers: output:3-5 on this layout, the whole run) fed the
first-stage latent at 128 px. Scores per image: excess objects (found minus asked, ``repetition_count``), prompt
adherence, and the distance to the native image (mean squared difference, in [0, 1] pixel values, between the 2x
result area-averaged back to 128 px and the first stage's decoded image: how closely the large image follows the
native one). Wall time: the two second passes interleaved, ratio = FM-only time / FM+AM time.

Run: .venv/bin/python benchmarks/fam_attention_proving.py [--few]   (--few: the 4 prompts and one seed of
``highres_proving.py --few``; default: its 13 prompts, seeds 0 and 1); writes
benchmarks/results/fam_attention_proving.{json,md}.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT / "benchmarks"))
from highres_proving import prompts, repetition  # noqa: E402
from proving_ground import boot, mean_adherence  # noqa: E402

log = logging.getLogger("preprint.bench")
STEPS, CFG, SAMPLER, SCHEDULER, SCALE = 20, 5.0, "dpmpp_2m", "karras", 2
METHODS = ("FAM frequency only", "FAM frequency + attention (weight 0.7)")


def second_pass(model, method: str, low: torch.Tensor, pos, neg, seed: int) -> torch.Tensor:
    import comfy.sample
    import comfy.utils

    from preprint.nodes.frequency_guidance import PreprintFAMAttention, PreprintFAMFrequency

    big = comfy.utils.common_upscale(low, low.shape[-1] * SCALE, low.shape[-2] * SCALE, "bicubic", "disabled")
    m = PreprintFAMFrequency.execute(model, {"samples": big}, 0.5)[0]
    if method == METHODS[1]:
        m = PreprintFAMAttention.execute(m, {"samples": low}, 0.7, "", 0.0, 1.0)[0]
    noise = comfy.sample.prepare_noise(big, seed + 1)
    with torch.no_grad():
        return comfy.sample.sample(m, noise, STEPS, CFG, SAMPLER, SCHEDULER, pos, neg, big, denoise=1.0,
                                   seed=seed + 1, disable_pbar=True)


def main():
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    boot()
    import comfy.sample

    from preprint.proving.models import encode, load_toy
    from preprint.proving.scenes import from_comfy_image

    model, clip, vae = load_toy("sd15")
    texts = prompts()
    few = "--few" in sys.argv
    seeds = (0,) if few else (0, 1)
    if few:
        texts = [texts[0], texts[3], texts[7], texts[9]]
    images = {m: [] for m in METHODS}
    native_images, timed = [], dict.fromkeys(METHODS, 0.0)
    for i, text in enumerate(texts):
        pos, neg = encode(clip, text), encode(clip, "")
        for seed in seeds:
            z = torch.zeros(1, vae.latent_channels, 16, 16)
            with torch.no_grad():
                low = comfy.sample.sample(model, comfy.sample.prepare_noise(z, seed), STEPS, CFG, SAMPLER, SCHEDULER,
                                          pos, neg, z, seed=seed, disable_pbar=True)
                native_images.append(from_comfy_image(vae.decode(low)).clamp(0, 1))
            order = METHODS if (i + seed) % 2 == 0 else METHODS[::-1]
            for method in order:
                t0 = time.perf_counter()
                out = second_pass(model, method, low, pos, neg, seed)
                timed[method] += time.perf_counter() - t0
                with torch.no_grad():
                    images[method].append(from_comfy_image(vae.decode(out)).clamp(0, 1))
    native = torch.cat(native_images)
    rows = []
    for method in METHODS:
        imgs = torch.cat(images[method])
        back = F.interpolate(imgs, size=native.shape[-2:], mode="area")
        adh = mean_adherence(imgs, texts, len(seeds))
        rows.append({"method": method, "images": imgs.shape[0], **repetition(imgs, texts, len(seeds)),
                     "adherence": adh["overall"], "colour": adh["colour"],
                     "distance_to_native": round(float((back - native).pow(2).mean()), 5),
                     "seconds": round(timed[method], 1)})
        log.info("%s", rows[-1])
    native_scores = {**repetition(native, texts, len(seeds)),
                     "adherence": mean_adherence(native, texts, len(seeds))["overall"]}
    ratio = round(timed[METHODS[0]] / timed[METHODS[1]], 3)
    result = {"prompts": len(texts), "seeds": list(seeds), "native_128": native_scores, "rows": rows,
              "speed_fm_plus_am_vs_fm_only": ratio, "command": " ".join(["benchmarks/fam_attention_proving.py",
                                                                          *sys.argv[1:]])}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "fam_attention_proving.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = ["# FAM frequency vs frequency + attention modulation on the SD1.5 toy at 2x (256 px)", "",
             f"Run: `.venv/bin/python {result['command']}`: {len(texts)} prompts x {len(seeds)} seed(s), "
             f"{STEPS} steps each stage. Native 128 px first stage: {json.dumps(native_scores)}.", "",
             "| method | images | excess objects / image | images with repeats | adherence | colour | distance to "
             "native (MSE) | seconds |", "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['method']} | {r['images']} | {r['excess_per_image']} | {r['images_with_repeats']} | "
              f"{r['adherence']} | {r['colour']} | {r['distance_to_native']} | {r['seconds']} |" for r in rows]
    lines += ["", f"Speed of FM + AM relative to FM alone (second passes only): {ratio}x."]
    (RESULTS / "fam_attention_proving.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
