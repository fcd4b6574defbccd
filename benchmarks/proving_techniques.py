"""The pack's techniques on the trained proving-ground toys: effects as numbers, against ComfyUI core.

All at 128x128 (the toys' training size), seeded, in one process; every technique at its node's defaults
unless the table says otherwise. Prompts: the proving-ground benchmark's one- and two-object prompts
(every 3rd one-object prompt and every 2nd two-object prompt: 7 + 12), seeds 0 and 1.

* samplers (sd15 toy, CFG 5): prompt adherence and distribution distance to the 40-step core Euler images
  of the same prompts and seeds (so the distance measures what too few steps lose), at 4, 6, 8 and 12
  steps, Preprint samplers against core Euler, DPM++ 2M and UniPC;
* guidance (sd15 toy): adherence with PAG, SEG, SAG (Preprint) and core PAG, at CFG 1 (guidance alone)
  and CFG 3 (with CFG), 20 steps DPM++ 2M Karras;
* CADS (sd15 toy, CFG 9): layout diversity across 6 seeds per prompt, and adherence, with and without;
* caches (sd15 toy: DeepCache, Block Cache, Encoder Propagation; flux toy: DiT Block Cache; core EasyCache on
  both): wall-time ratio against the uncached model (runs interleaved), forward passes, adherence change
  and drift of the decoded images.

Run: .venv/bin/python benchmarks/proving_techniques.py [samplers] [guidance] [cads] [caches]
writes benchmarks/results/proving_techniques.{json,md} and proving_techniques_<section>.png.
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
from caching_speed import Counter  # noqa: E402
from proving_ground import boot, contact_sheet, mean_adherence, prompts  # noqa: E402

log = logging.getLogger("preprint.bench")
SEEDS = (0, 1)


def texts() -> list[str]:
    single, pair = prompts()
    return single[::3] + pair[::2]


def defaults(node_cls) -> dict:
    return {i.id: i.default for i in node_cls.define_schema().inputs if getattr(i, "default", None) is not None}


def gen(model, clip, vae, prompts_, **kw) -> torch.Tensor:
    from preprint.proving.models import generate

    kw.setdefault("seeds", SEEDS)
    return generate(model, clip, vae, prompts_, **kw)


def samplers() -> tuple[list[dict], torch.Tensor]:
    from preprint.proving.metrics import distribution_distance
    from preprint.proving.models import load_toy

    model, clip, vae = load_toy("sd15")
    ts = texts()
    ref = gen(model, clip, vae, ts, steps=40, cfg=5.0, sampler="euler", scheduler="karras")
    rows = [{"sampler": "euler (reference)", "steps": 40, **mean_adherence(ref, ts, len(SEEDS)), "distance": 0.0}]
    sheet = []
    for name in ("euler", "dpmpp_2m", "uni_pc", "preprint_dpmpp_2m", "preprint_dpmpp_3m", "preprint_deis",
                 "preprint_evodiff"):
        for steps in (4, 6, 8, 12):
            imgs = gen(model, clip, vae, ts, steps=steps, cfg=5.0, sampler=name, scheduler="karras")
            d = distribution_distance(imgs, ref).overall
            rows.append({"sampler": name, "steps": steps, **mean_adherence(imgs, ts, len(SEEDS)),
                         "distance": round(d, 3)})
            if steps == 6:
                sheet.append(imgs[:: len(SEEDS)][:8])
            log.info("sampler %s %d: %s", name, steps, rows[-1])
    return rows, torch.cat([ref[:: len(SEEDS)][:8], *sheet])


def guidance() -> tuple[list[dict], torch.Tensor]:
    from comfy_extras.nodes_pag import PerturbedAttentionGuidance

    from preprint.nodes.pag import PreprintPerturbedAttentionGuidance as PreprintPAG
    from preprint.nodes.pag import PreprintSmoothedEnergyGuidance as PreprintSEG
    from preprint.nodes.sag import PreprintSelfAttentionGuidance as PreprintSAG
    from preprint.proving.models import load_toy

    model, clip, vae = load_toy("sd15")
    ts = texts()
    variants = {
        "none": lambda m: m,
        "PAG (Preprint)": lambda m: PreprintPAG.execute(m, **defaults(PreprintPAG))[0],
        "SEG (Preprint)": lambda m: PreprintSEG.execute(m, **defaults(PreprintSEG))[0],
        "SAG (Preprint)": lambda m: PreprintSAG.execute(m, **defaults(PreprintSAG))[0],
        "core PAG": lambda m: PerturbedAttentionGuidance.execute(m, 3.0)[0],
    }
    rows, sheet = [], []
    for cfg in (1.0, 3.0):
        for label, make in variants.items():
            imgs = gen(make(model), clip, vae, ts, steps=20, cfg=cfg)
            rows.append({"method": label, "cfg": cfg, **mean_adherence(imgs, ts, len(SEEDS))})
            sheet.append(imgs[:: len(SEEDS)][:8])
            log.info("guidance %s", rows[-1])
    return rows, torch.cat(sheet)


def cads() -> tuple[list[dict], torch.Tensor]:
    from preprint.nodes.cfg import PreprintCADS
    from preprint.proving.metrics import diversity
    from preprint.proving.models import load_toy

    model, clip, vae = load_toy("sd15")
    ts = texts()[:: 3]
    seeds = tuple(range(6))
    rows, sheet = [], []
    for label, m in (("none", model), ("CADS (Preprint)", PreprintCADS.execute(model, **defaults(PreprintCADS))[0])):
        imgs = gen(m, clip, vae, ts, steps=20, cfg=9.0, seeds=seeds)
        per_prompt = [diversity(imgs[i * len(seeds):(i + 1) * len(seeds)], mode="layout") for i in range(len(ts))]
        rows.append({"method": label, "cfg": 9.0, "layout_diversity": round(sum(per_prompt) / len(per_prompt), 4),
                     **mean_adherence(imgs, ts, len(seeds))})
        sheet.append(imgs[: 2 * len(seeds)])
        log.info("cads %s", rows[-1])
    return rows, torch.cat(sheet)


def caches() -> tuple[list[dict], torch.Tensor]:
    import comfy.patcher_extension as pe
    from comfy_extras.nodes_easycache import EasyCacheNode

    from preprint.nodes.caching import (
        PreprintBlockCache,
        PreprintDeepCache,
        PreprintDiTBlockCache,
        PreprintEncoderPropagation,
    )
    from preprint.proving.models import load_toy

    ts = texts()[::2]
    easy = {"reuse_threshold": 0.2, "start_percent": 0.15, "end_percent": 0.95, "verbose": False}
    setups = {
        "sd15": {"settings": {"sampler": "dpmpp_2m", "scheduler": "karras", "cfg": 5.0}, "variants": {
            "DeepCache (Preprint)": lambda m: PreprintDeepCache.execute(m, **defaults(PreprintDeepCache))[0],
            "Block Cache (Preprint)": lambda m: PreprintBlockCache.execute(m, **defaults(PreprintBlockCache))[0],
            "Encoder Propagation (Preprint)": lambda m: PreprintEncoderPropagation.execute(
                m, **defaults(PreprintEncoderPropagation))[0],
            "core EasyCache 0.2": lambda m: EasyCacheNode.execute(m, **easy)[0]}},
        "flux": {"settings": {"sampler": "euler", "scheduler": "simple", "cfg": 4.0}, "variants": {
            "DiT Block Cache (Preprint)": lambda m: PreprintDiTBlockCache.execute(
                m, **defaults(PreprintDiTBlockCache))[0],
            "core EasyCache 0.2": lambda m: EasyCacheNode.execute(m, **easy)[0]}},
    }
    rows, sheet = [], []
    for arch, setup in setups.items():
        model, clip, vae = load_toy(arch)
        s = setup["settings"]
        kw = {"steps": 20, "cfg": s["cfg"], "sampler": s["sampler"], "scheduler": s["scheduler"]}
        gen(model, clip, vae, ts[:1], seeds=(0,), **kw)  # warm-up
        for label, make in setup["variants"].items():
            fast = make(model)
            counter = Counter()
            fast.add_wrapper_with_key(pe.WrappersMP.DIFFUSION_MODEL, "bench_calls", counter)
            times = {"plain": 0.0, "fast": 0.0}
            outs = {"plain": [], "fast": []}
            for i, text in enumerate(ts):
                for seed in SEEDS:
                    order = (("plain", model), ("fast", fast))
                    for name, m in order if (i + seed) % 2 == 0 else order[::-1]:
                        t0 = time.perf_counter()
                        outs[name].append(gen(m, clip, vae, [text], seeds=(seed,), **kw))
                        times[name] += time.perf_counter() - t0
            a, b = torch.cat(outs["plain"]), torch.cat(outs["fast"])
            runs = len(ts) * len(SEEDS)
            rows.append({"model": arch, "method": label, "speed_ratio": round(times["plain"] / times["fast"], 3),
                         "forward_passes_per_run": round(counter.calls / runs, 1),
                         "drift": round(float((b - a).norm() / a.norm()), 4),
                         "adherence_plain": mean_adherence(a, ts, len(SEEDS))["overall"],
                         "adherence_cached": mean_adherence(b, ts, len(SEEDS))["overall"]})
            sheet.append(torch.cat([a[:: len(SEEDS)][:4], b[:: len(SEEDS)][:4]]))
            log.info("cache %s", rows[-1])
    return rows, torch.cat(sheet)


def markdown(results: dict) -> str:
    out = ["# The pack's techniques on the trained proving-ground toys", "",
           "Run: `.venv/bin/python benchmarks/proving_techniques.py` (128x128, seeds 0 and 1; see the module "
           "docstring for prompts and settings). Contact sheets: proving_techniques_<section>.png.", ""]
    for section, rows in results.items():
        if not isinstance(rows, list) or not rows:
            continue
        keys = list(rows[0])
        out += [f"## {section}", "", "| " + " | ".join(keys) + " |", "|---" * len(keys) + "|"]
        out += ["| " + " | ".join(str(r.get(k)) for k in keys) + " |" for r in rows]
        out.append("")
    return "\n".join(out)


def main():
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    boot()
    only = set(sys.argv[1:]) or {"samplers", "guidance", "cads", "caches"}
    path = RESULTS / "proving_techniques.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    for name, fn in (("samplers", samplers), ("guidance", guidance), ("cads", cads), ("caches", caches)):
        if name in only:
            results[name], sheet = fn()
            contact_sheet(sheet, RESULTS / f"proving_techniques_{name}.png", columns=8)
    path.write_text(json.dumps(results, indent=1) + "\n")
    (RESULTS / "proving_techniques.md").write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
