"""Proving-ground scores: what the trained toys draw, and what the DiT Block Cache costs on the trained DiT.

For each toy (sd15: DPM-Solver++ 2M Karras; flux: Euler simple), 20 steps, CFG 5 (sd15) / 4 (flux), at
128x128, through ComfyUI's own sampler (``comfy.sample.sample``), decoded by the toy's VAE:

* prompt adherence (colour, shape, count, position, background; see ``proving.metrics``) on every
  one-object prompt (7 colours x 3 shapes, each in a named cell) and on 24 two-object prompts with a
  relation, 2 seeds each;
* chance: the same specs scored on images sampled from the empty prompt (what the model draws when it
  ignores the text);
* reference: the generator's own renderings of the same prompts, scored the same way (the scorers'
  ceiling);
* distribution distance of 48 unconditional samples to 48 fresh generator scenes, next to the distance
  between two independent generator draws of that size.

DiT Block Cache (thresholds 0.12, the node's default, and 0.3; AB-2) on the flux toy, against the uncached model
in the same process on the same prompts and seeds, runs interleaved: wall-time ratio (sum over runs),
block evaluations skipped, adherence of both, and drift ||cached - uncached|| / ||uncached|| of the
decoded images.

Run: .venv/bin/python benchmarks/proving_ground.py [sd15] [flux] [cache]
writes benchmarks/results/proving_ground.{json,md} and proving_ground_<toy>.png (contact sheets).
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

SETTINGS = {"sd15": {"sampler": "dpmpp_2m", "scheduler": "karras", "cfg": 5.0},
            "flux": {"sampler": "euler", "scheduler": "simple", "cfg": 4.0}}
STEPS, SIZE, SEEDS = 20, 128, (0, 1)
if "--quick" in sys.argv:  # pipeline check: few steps, one seed
    sys.argv.remove("--quick")
    STEPS, SEEDS = 3, (0,)


def boot():
    from preprint.runner import comfy_host as ch

    path = ch.find_comfyui()
    if path is None:
        sys.exit("proving-ground benchmark: " + ch.why_not_found())
    return ch.boot(path)


def prompts() -> tuple[list[str], list[str]]:
    """One-object prompts (every colour and shape, in a cell) and two-object prompts with relations."""
    from preprint.proving.palette import CELL_PHRASES, OBJECT_COLOURS, RELATIONS, SHAPES

    colours, cells = list(OBJECT_COLOURS), list(CELL_PHRASES.values())
    backgrounds = ("white", "black", "grey")
    single = [f"a {c} {s} {cells[(i * 3 + j) % len(cells)]} on a {backgrounds[(i + j) % 3]} background"
              for i, c in enumerate(colours) for j, s in enumerate(SHAPES)]
    g = torch.Generator().manual_seed(5)
    pair = []
    while len(pair) < 24:
        a, b = (colours[int(i)] for i in torch.randperm(len(colours), generator=g)[:2])
        sa, sb = (SHAPES[int(i)] for i in torch.randint(0, 3, (2,), generator=g))
        rel = RELATIONS[len(pair) % len(RELATIONS)]
        pair.append(f"a {a} {sa} {rel} a {b} {sb} on a {backgrounds[len(pair) % 3]} background")
    return single, pair


def generate(model, clip, vae, texts: list[str], settings: dict, seeds=SEEDS) -> torch.Tensor:
    from preprint.proving.models import generate as sample_toy

    return sample_toy(model, clip, vae, texts, seeds=seeds, steps=STEPS, cfg=settings["cfg"],
                      sampler=settings["sampler"], scheduler=settings["scheduler"], width=SIZE, height=SIZE)


def mean_adherence(images: torch.Tensor, texts: list[str], per_prompt: int) -> dict:
    from preprint.proving.metrics import prompt_adherence
    from preprint.proving.scenes import parse_caption

    rows = [prompt_adherence(images[i], parse_caption(texts[i // per_prompt])) for i in range(images.shape[0])]

    def avg(name):
        vals = [getattr(r, name) for r in rows if getattr(r, name) is not None]
        return round(sum(vals) / len(vals), 3) if vals else None

    return {k: avg(k) for k in ("colour", "shape", "count", "position", "background", "overall")}


def reference_images(texts: list[str], per_prompt: int) -> torch.Tensor:
    from preprint.proving.scenes import parse_caption, render, scene_from_spec

    g = torch.Generator().manual_seed(9)
    return torch.stack([render(scene_from_spec(parse_caption(t), g), SIZE, SIZE) for t in texts
                        for _ in range(per_prompt)])


def round_trip(vae, images: torch.Tensor) -> torch.Tensor:
    """Generator images encoded and decoded by the toy's VAE (what the VAE alone costs the scores)."""
    from preprint.proving.scenes import from_comfy_image, to_comfy_image

    return from_comfy_image(vae.decode(vae.encode(to_comfy_image(images)))).clamp(0, 1)


def contact_sheet(images: torch.Tensor, path: Path, columns: int = 12) -> None:
    from PIL import Image

    n, _, h, w = images.shape
    rows = (n + columns - 1) // columns
    sheet = torch.ones(3, rows * (h + 2), columns * (w + 2))
    for i in range(n):
        r, c = divmod(i, columns)
        sheet[:, r * (h + 2):r * (h + 2) + h, c * (w + 2):c * (w + 2) + w] = images[i]
    arr = (sheet.permute(1, 2, 0).clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    Image.fromarray(arr).save(path)


def score_toy(arch: str) -> dict:
    from preprint.proving.metrics import distribution_distance
    from preprint.proving.models import load_toy
    from preprint.proving.scenes import sample_batch

    model, clip, vae = load_toy(arch)
    settings = SETTINGS[arch]
    single, pair = prompts()
    k = len(SEEDS)
    t0 = time.perf_counter()
    img1 = generate(model, clip, vae, single, settings)
    img2 = generate(model, clip, vae, pair, settings)
    # chance: what the model draws from the empty prompt, scored against the same asks
    empty1 = generate(model, clip, vae, [""] * len(single), settings)
    empty2 = generate(model, clip, vae, [""] * len(pair), settings)
    result = {
        "settings": {**settings, "steps": STEPS, "size": SIZE, "seeds": list(SEEDS)},
        "one_object": mean_adherence(img1, single, k),
        "two_objects": mean_adherence(img2, pair, k),
        "chance_one_object": mean_adherence(empty1, single, k),
        "chance_two_objects": mean_adherence(empty2, pair, k),
        "reference_one_object": mean_adherence(reference_images(single, k), single, k),
        "reference_two_objects": mean_adherence(reference_images(pair, k), pair, k),
        "vae_round_trip_two_objects": mean_adherence(round_trip(vae, reference_images(pair, k)), pair, k),
    }
    uncond = torch.cat([empty1, empty2])[:48]
    fresh_a, _, _ = sample_batch(48, torch.Generator().manual_seed(21), SIZE, SIZE)
    fresh_b, _, _ = sample_batch(48, torch.Generator().manual_seed(22), SIZE, SIZE)
    result["distance_uncond_to_generator"] = round(distribution_distance(uncond, fresh_a).overall, 3)
    result["distance_generator_to_generator"] = round(distribution_distance(fresh_b, fresh_a).overall, 3)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    contact_sheet(torch.cat([img1[::k], img2[::k]]), RESULTS / f"proving_ground_{arch}.png")
    log.info("%s: %s", arch, json.dumps(result))
    return result


def dit_cache(threshold: float = 0.12) -> dict:
    """The DiT Block Cache on the trained flux toy against the uncached toy, interleaved, same seeds."""
    import comfy.patcher_extension as pe

    from preprint.nodes.caching import PreprintDiTBlockCache
    from preprint.proving.models import load_toy

    model, clip, vae = load_toy("flux")
    settings = SETTINGS["flux"]
    single, pair = prompts()
    texts = single[::3] + pair[::3]  # 7 + 8 prompts
    cached = PreprintDiTBlockCache.execute(model, threshold, 2, 3, 0.0, 1.0)[0]
    generate(model, clip, vae, texts[:1], settings, seeds=(0,))  # warm-up
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from caching_speed import block_timer

    cost, handles = block_timer(model, "flux")  # seconds per block in one uncached run, to weight skips
    generate(model, clip, vae, texts[:1], settings, seeds=(0,))
    for h in handles:
        h.remove()
    times = {"uncached": 0.0, "cached": 0.0}
    images = {"uncached": [], "cached": []}
    skipped, skipped_compute, runs = 0.0, 0.0, 0
    for text in texts:
        for seed in SEEDS:
            pair = (("uncached", model), ("cached", cached))
            for name, m in pair if runs % 2 == 0 else pair[::-1]:  # alternate who goes first
                t0 = time.perf_counter()
                images[name].append(generate(m, clip, vae, [text], settings, seeds=(seed,)))
                times[name] += time.perf_counter() - t0
            counts = cached.get_wrappers(pe.WrappersMP.OUTER_SAMPLE, "preprint_dit_cache")[0].last_report["counts"]
            skipped += counts.skipped_fraction()
            skipped_compute += counts.skipped_fraction(cost)
            runs += 1
    a, b = torch.cat(images["uncached"]), torch.cat(images["cached"])
    return {
        "threshold": threshold, "order": 2, "max_consecutive_skips": 3, "prompts": len(texts), "seeds": list(SEEDS),
        "speed_ratio": round(times["uncached"] / times["cached"], 3),
        "block_evaluations_skipped": round(skipped / runs, 3),
        "block_compute_skipped": round(skipped_compute / runs, 3),
        "drift": round(float((b - a).norm() / a.norm()), 4),
        "adherence_uncached": mean_adherence(a, texts, len(SEEDS)),
        "adherence_cached": mean_adherence(b, texts, len(SEEDS)),
    }


def main():
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    boot()
    torch.manual_seed(0)
    only = set(sys.argv[1:]) or {"sd15", "flux", "cache"}
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / "proving_ground.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    results["torch_threads"] = torch.get_num_threads()
    for arch in ("sd15", "flux"):
        if arch in only:
            results[arch] = score_toy(arch)
    if "cache" in only:
        results["dit_cache"] = [dit_cache(th) for th in (0.12, 0.3)]  # the node's default, and a faster setting
        log.info("dit cache: %s", json.dumps(results["dit_cache"]))
    path.write_text(json.dumps(results, indent=1) + "\n")
    (RESULTS / "proving_ground.md").write_text(markdown(results))
    print(markdown(results))


def markdown(results: dict) -> str:
    lines = ["# Proving ground: the trained toys at 20 steps", "",
             "Run: `.venv/bin/python benchmarks/proving_ground.py` (writes this file, proving_ground.json and the "
             "contact sheets proving_ground_<toy>.png: one image per prompt, one-object prompts first).", ""]
    aspects = ("colour", "shape", "count", "position", "background", "overall")
    for arch in ("sd15", "flux"):
        r = results.get(arch)
        if not r:
            continue
        lines += [f"## {arch} ({json.dumps(r['settings'])})", "",
                  "| prompts | images | " + " | ".join(aspects) + " |", "|---" * (len(aspects) + 2) + "|"]
        for key, label in (("one_object", "one object"), ("chance_one_object", "one object, chance"),
                           ("reference_one_object", "one object, generator"), ("two_objects", "two objects"),
                           ("chance_two_objects", "two objects, chance"),
                           ("reference_two_objects", "two objects, generator"),
                           ("vae_round_trip_two_objects", "two objects, generator through the VAE")):
            src = ("empty prompt" if "chance" in key else "generator" if "reference" in key
                   else "VAE round trip" if "vae" in key else "toy")
            lines.append(f"| {label} | {src} | " + " | ".join(str(r[key][a]) for a in aspects) + " |")
        lines += ["", f"Distribution distance, unconditional samples vs fresh generator scenes (48 each): "
                      f"{r['distance_uncond_to_generator']} (two generator draws: "
                      f"{r['distance_generator_to_generator']}).", ""]
    caches = results.get("dit_cache") or []
    for c in caches if isinstance(caches, list) else [caches]:
        lines += [f"## DiT Block Cache on the flux toy, threshold {c['threshold']}", "",
                  f"AB-{c['order']}, {c['prompts']} prompts x {len(c['seeds'])} seeds, cached and uncached runs "
                  "interleaved in one process.", "",
                  f"- wall-time ratio uncached / cached: {c['speed_ratio']}x",
                  f"- block evaluations skipped: {100 * c['block_evaluations_skipped']:.0f}%; block compute skipped "
                  f"(weighted by each block's measured time): {100 * c['block_compute_skipped']:.0f}%",
                  f"- drift of the decoded images: {c['drift']}",
                  f"- adherence uncached: {json.dumps(c['adherence_uncached'])}",
                  f"- adherence cached: {json.dumps(c['adherence_cached'])}", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
