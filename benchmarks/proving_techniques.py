"""The pack's techniques on the trained proving-ground toys: effects as numbers, against ComfyUI core.

All at 128x128 (the toys' training size), seeded, in one process; every technique at its node's defaults
unless the table says otherwise. Prompts: the proving-ground benchmark's one- and two-object prompts
(every 3rd one-object prompt and every 2nd two-object prompt: 7 + 12), seeds 0 and 1.

* samplers (sd15 toy, CFG 5): prompt adherence and distribution distance to the 40-step core Euler images
  of the same prompts and seeds (so the distance measures what too few steps lose), at 4, 6, 8 and 12
  steps, Preprint samplers against core Euler, DPM++ 2M and UniPC; and the calibrated solvers, each calibrated on
  the toy itself first (CFG 5, 128x128, one held-out two-object prompt, into a temporary calibration folder) with
  the calibration seconds in the table: DPM-Solver-v3 with statistics at grid_points 20, 8 samples (its node's
  defaults, 60 x 32, are 12 times the calls; one file serves every step count), DC-Solver with ratios
  searched at each step count and Euler on an Optimal Steps schedule searched at each step count (both at their
  nodes' defaults);
* guidance (sd15 toy): adherence with PAG, SEG, SAG (Preprint) and core PAG, at CFG 1 (guidance alone)
  and CFG 3 (with CFG), 20 steps DPM++ 2M Karras;
* CADS (sd15 toy, CFG 9): layout diversity across 6 seeds per prompt, and adherence, with and without;
* caches (sd15 toy: DeepCache, Block Cache, Encoder Propagation; flux toy: DiT Block Cache; core EasyCache on
  both): wall-time ratio against the uncached model (runs interleaved), forward passes, adherence change
  and drift of the decoded images.

Run: .venv/bin/python benchmarks/proving_techniques.py [samplers] [guidance] [cads] [caches]
(PREPRINT_BENCH_QUICK=1: samplers on 2 prompts at 4 and 8 steps with tiny calibrations, a check of the wiring;
its numbers mean nothing, and it still writes the results files)
writes benchmarks/results/proving_techniques.{json,md} and proving_techniques_<section>.png.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
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


# the calibrated solvers' settings on the toy: DC-Solver and OSS at their nodes' defaults; the v3 statistics at a
# reduced grid and sample count (its defaults, 60 x 32, are 12 times the calls of this one);
# PREPRINT_BENCH_QUICK shrinks all three for a check of the wiring
CALIBRATION = {"v3": {"grid_points": 20, "samples": 8, "chunk": 8},
               "dc": {"reference_steps": 200, "samples": 10}, "oss": {"teacher_steps": 100, "samples": 4}}
CALIBRATION_QUICK = {"v3": {"grid_points": 4, "samples": 2, "chunk": 2},
                     "dc": {"reference_steps": 20, "samples": 1}, "oss": {"teacher_steps": 20, "samples": 1}}


def quick() -> bool:
    return os.environ.get("PREPRINT_BENCH_QUICK", "") not in ("", "0")


def gen_custom(model, clip, vae, prompts_, sampler, sigmas, cfg: float) -> torch.Tensor:
    """``gen`` for a SAMPLER object and its sigmas (as SamplerCustom does), same noises and decoding."""
    import comfy.sample

    from preprint.proving.models import encode
    from preprint.proving.scenes import from_comfy_image

    neg, out = encode(clip, ""), []
    with torch.no_grad():
        for text in prompts_:
            pos = encode(clip, text)
            for seed in SEEDS:
                latent = torch.zeros(1, vae.latent_channels, 16, 16)
                noise = comfy.sample.prepare_noise(latent, seed)
                samples = comfy.sample.sample_custom(model, noise, cfg, sampler, sigmas, pos, neg, latent, seed=seed,
                                                     disable_pbar=True)
                out.append(from_comfy_image(vae.decode(samples)))
    return torch.cat(out).clamp(0, 1)


def calibrated(model, clip, cfg: float, steps_list) -> dict:
    """The calibrated solvers, calibrated on the toy itself (into a temporary folder, recomputed): for each label a
    dict steps -> (SAMPLER, sigmas, calibration seconds). The calibration prompt is a two-object prompt the scores
    do not use; the latent is the toy's 128x128 (16x16)."""
    import comfy.samplers

    from preprint.nodes.dc_solver import PreprintDCSolver, PreprintDCSolverSearch
    from preprint.nodes.dpm_solver_v3 import PreprintDPMSolverV3Statistics, PreprintSamplerDPMSolverV3
    from preprint.nodes.optimal_steps import PreprintOptimalStepsSearch
    from preprint.proving.models import encode

    os.environ["PREPRINT_CALIBRATION_DIR"] = tempfile.mkdtemp(prefix="proving-calibration-")
    settings = CALIBRATION_QUICK if quick() else CALIBRATION
    pos, neg = encode(clip, prompts()[1][1]), encode(clip, "")
    latent = {"samples": torch.zeros(1, 4, 16, 16)}
    ms = model.get_model_object("model_sampling")
    out: dict = {"preprint_dpm_solver_v3 (calibrated)": {}, "dc_solver (searched)": {}, "euler + OSS schedule": {}}
    with torch.inference_mode():  # as ComfyUI's executor runs nodes
        t0 = time.perf_counter()
        stats = PreprintDPMSolverV3Statistics.execute(
            model, pos, neg, cfg, latent, trajectory_substeps=1, seed=0, derivatives="auto", recompute=True,
            **settings["v3"]).result[0]
        v3_s = time.perf_counter() - t0  # one statistics file serves every step count
        v3 = PreprintSamplerDPMSolverV3.execute(2, True, True, statistics=stats).result[0]
        for steps in steps_list:
            karras = comfy.samplers.calculate_sigmas(ms, "karras", steps).cpu()
            out["preprint_dpm_solver_v3 (calibrated)"][steps] = (v3, karras, v3_s)
            t0 = time.perf_counter()
            ratios, sig = PreprintDCSolverSearch.execute(model, pos, neg, cfg, latent, steps, scheduler="karras",
                                                         seed=0, recompute=True, **settings["dc"]).result
            dc = PreprintDCSolver.execute(mode="searched", ratios=ratios).result[0]
            out["dc_solver (searched)"][steps] = (dc, sig, time.perf_counter() - t0)
            t0 = time.perf_counter()
            sig, _ = PreprintOptimalStepsSearch.execute(model, pos, neg, latent, steps, cfg=cfg, seed=0,
                                                        teacher_grid="simple", recompute=True,
                                                        **settings["oss"]).result
            out["euler + OSS schedule"][steps] = (comfy.samplers.sampler_object("euler"), sig,
                                                  time.perf_counter() - t0)
    return out


def samplers() -> tuple[list[dict], torch.Tensor]:
    from preprint.proving.metrics import distribution_distance
    from preprint.proving.models import load_toy

    model, clip, vae = load_toy("sd15")
    ts = texts()[:2] if quick() else texts()
    steps_list = (4, 8) if quick() else (4, 6, 8, 12)
    ref = gen(model, clip, vae, ts, steps=40, cfg=5.0, sampler="euler", scheduler="karras")
    rows = [{"sampler": "euler (reference)", "steps": 40, **mean_adherence(ref, ts, len(SEEDS)), "distance": 0.0,
             "calibration_s": 0.0}]
    sheet = []

    def add(name, steps, imgs, calibration_s=0.0):
        d = distribution_distance(imgs, ref).overall
        rows.append({"sampler": name, "steps": steps, **mean_adherence(imgs, ts, len(SEEDS)), "distance": round(d, 3),
                     "calibration_s": round(calibration_s, 1)})
        if steps == 6 or (quick() and steps == steps_list[0]):
            sheet.append(imgs[:: len(SEEDS)][:8])
        log.info("sampler %s %d: %s", name, steps, rows[-1])

    for name in ("euler", "dpmpp_2m", "uni_pc", "preprint_dpmpp_2m", "preprint_dpmpp_3m", "preprint_deis",
                 "preprint_evodiff"):
        for steps in steps_list:
            add(name, steps, gen(model, clip, vae, ts, steps=steps, cfg=5.0, sampler=name, scheduler="karras"))
    for name, per_steps in calibrated(model, clip, 5.0, steps_list).items():
        for steps, (sampler, sigmas, seconds) in per_steps.items():
            add(name, steps, gen_custom(model, clip, vae, ts, sampler, sigmas, 5.0), seconds)
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
