"""What the calibrated samplers cost to calibrate: wall time, model calls and memory, measured and extrapolated.

Nodes: DPM-Solver-v3 Statistics, DC-Solver Ratio Search, DC-Solver CPR Fit and Optimal Steps Search, each at a
fast setting (FAST below) and, with --defaults, at its node's defaults (about 1-2 hours on one shared CPU thread:
the v3 defaults alone are 976 finite-difference calls of 8 samples). Without --defaults the defaults' calls and rows
come from the cost formulas of the nodes' descriptions (``counted_cost``), which every measured run checks against
its counted calls and rows (``formula_ok``). Runs go through the node class (``execute``, in inference mode as
ComfyUI's executor runs nodes) on the tiny random-weight SD1.5 and Flux layouts (runner/tiny_models.py) at an 8x8
latent, into a temporary PREPRINT_CALIBRATION_DIR. Every calibration runs in a fresh subprocess, so its peak RSS
growth (resource.getrusage ru_maxrss after the node minus before it, ComfyUI and the model already loaded) is its
own. Model calls and the rows (samples) they carry are counted by a DIFFUSION_MODEL wrapper on a clone of the model.
Flux runs at CFG 1 (Flux dev is guidance-distilled: one pass per step, ComfyUI skips the uncond at CFG 1), except the
CPR Fit, whose cfg_list needs 3 scales (its default 3, 6, 9); SD1.5 at the nodes' default CFG 7. The CPR Fit
default steps_list (5, 7, 10) cannot fit degree 2 on a flow model (its ratios
act from index 3), so Flux uses 6, 8, 10 there.

Full-size estimate (SD1.5 512x512, SDXL 1024x1024, Flux 1024x1024): the counted rows x an assumed per-row time on an
RTX 4090 (ASSUMED_ROW_SECONDS, from commonly published it/s figures; an assumption, not a measurement), x a forward-
mode JVP factor for the v3 statistics; plus the memory the calibration itself keeps, computed from the latent shape
and the settings (analytic; model weights and activations of one batch are not included).

Run: OMP_NUM_THREADS=1 .venv/bin/python benchmarks/calibration_cost.py [--defaults] [--only CASE]
(about 5 minutes on one CPU thread without --defaults; each subprocess boots ComfyUI, ~20 s)
writes benchmarks/results/calibration_cost.{json,md}.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
H = W = 8  # latent of the tiny runs (64 px)
FAMILIES = ("sd15", "flux")

NODES = {"v3_statistics": "PreprintDPMSolverV3Statistics", "dc_search": "PreprintDCSolverSearch",
         "dc_cpr_fit": "PreprintDCSolverCPRFit", "oss_search": "PreprintOptimalStepsSearch"}
FAST = {
    "v3_statistics": {"grid_points": 10, "samples": 4, "chunk": 4},
    "dc_search": {"reference_steps": 20, "samples": 1},
    "dc_cpr_fit": {"reference_steps": 20, "samples": 1, "iterations": 2},
    "oss_search": {"teacher_steps": 20, "samples": 1},
}
# Seconds per latent row (one image through the network once) on an RTX 4090, fp16/bf16, from commonly published
# figures: SD1.5 512x512 ~20 it/s with CFG (2 rows per it) -> 0.025 s; SDXL 1024x1024 ~6 it/s with CFG -> 0.083 s;
# Flux dev 1024x1024 ~1 it/s, one row per it (guidance-distilled) -> 1.0 s. Rows are assumed to cost linearly in a
# batch (the GPU is saturated at these sizes). Assumptions, not measurements.
ASSUMED_ROW_SECONDS = {"sd15": 0.025, "sdxl": 0.083, "flux": 1.0}
JVP_FACTOR = 2.5  # a forward-mode JVP carries a tangent through every op: assumed ~2.5x a plain pass
FULL = {"sd15": ("sd15", (4, 64, 64)), "sdxl": ("sd15", (4, 128, 128)), "flux": ("flux", (16, 128, 128))}


def node_defaults(node_cls) -> dict:
    return {i.id: i.default for i in node_cls.define_schema().inputs if getattr(i, "default", None) is not None}


def child(case: str, setting: str, family: str) -> dict:
    """One calibration in this (fresh) process: returns its measurements."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from proving_ground import boot

    boot()
    import torch

    sys.path.insert(0, str(ROOT))
    from tests.host.harness import counted, make_conds, make_latent, node_class, tiny_model

    torch.set_num_threads(1)
    cls = node_class(NODES[case])
    settings = {k: v for k, v in node_defaults(cls).items()
                if k not in ("model", "positive", "negative", "latent", "latent_image")}
    if setting == "fast":
        settings.update(FAST[case])
    if family == "flux":
        if "cfg" in settings:
            settings["cfg"] = 1.0
        if case == "dc_cpr_fit":
            settings["steps_list"] = "6, 8, 10"
    settings["recompute"] = True if "recompute" in settings else None
    settings = {k: v for k, v in settings.items() if v is not None}
    with torch.inference_mode():
        model = tiny_model(family, seed=1)
        counter = counted(model)
        pos, neg = make_conds(family)
        latent = {"samples": make_latent(family, 1, H, W)}
        key = "latent" if case == "v3_statistics" else "latent_image"
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        t0 = time.perf_counter()
        cls.execute(model=counter.model, positive=pos, negative=neg, **{key: latent}, **settings)
        wall = time.perf_counter() - t0
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if case == "v3_statistics":  # which derivatives "auto" ended up with: the saved file's metadata says
        from preprint.nodes.dpm_solver_v3 import KIND
        from preprint.utils import calibration_store as store

        newest = store.listing(os.environ["PREPRINT_CALIBRATION_DIR"], KIND)[0]
        settings["derivatives_used"] = newest[2]["derivatives_used"]
    settings = {k: v for k, v in settings.items() if k != "recompute"}
    return {"node": case, "setting": setting, "family": family, "wall_s": round(wall, 2), "model_calls": counter.calls,
            "rows": sum(counter.rows), "rss_growth_mb": round((after - before) / 1024, 1),
            "formula_ok": counted_cost(case, settings, family) == (counter.calls, sum(counter.rows)),
            "settings": settings}


def settings_for(case: str, setting: str, family: str) -> dict:
    """The node's widget values of a run, without booting ComfyUI (for the defaults' formula rows)."""
    base = {"v3_statistics": {"cfg": 7.0, "grid_points": 60, "samples": 32, "chunk": 8, "trajectory_substeps": 1,
                              "derivatives": "auto"},
            "dc_search": {"cfg": 7.0, "steps": 6, "reference_steps": 200, "samples": 10},
            "dc_cpr_fit": {"cfg_list": "3, 6, 9", "steps_list": "5, 7, 10", "reference_steps": 200,
                           "samples": 10, "iterations": 20},
            "oss_search": {"cfg": 7.0, "steps": 10, "teacher_steps": 100, "samples": 4}}[case]
    out = {**base, **(FAST[case] if setting == "fast" else {})}
    if family == "flux" and case != "dc_cpr_fit":
        out["cfg"] = 1.0
        if case == "dc_cpr_fit":
            out["steps_list"] = "6, 8, 10"
    return out


def counted_cost(case: str, s: dict, family: str) -> tuple[int, int]:
    """(model calls, rows) a calibration makes, from the cost formulas in the nodes' descriptions; checked against
    the counted calls of every measured run (``formula_ok``) and used for the defaults when they are not run."""
    guided = 1 if float(s.get("cfg", 0.0)) == 1.0 else 2  # ComfyUI skips the uncond pass at CFG 1
    if case == "v3_statistics":
        chunks = -(-s["samples"] // s["chunk"])
        # two calls a finite-difference JVP (what "auto" uses): the +- pair batched, then the centre
        fd = s["derivatives"] != "forward"
        jvps = (s["grid_points"] + 1) * 2 * chunks
        rows_per = min(s["chunk"], s["samples"]) * guided
        calls, rows = jvps * (2 if fd else 1), jvps * rows_per * (3 if fd else 1)
        first = 1 if family == "flux" else 0  # the flow march first leaves sigma = 1: one plain call of all samples
        calls, rows = calls + first, rows + first * s["samples"] * guided
        return calls, rows
    if case in ("dc_search", "dc_cpr_fit"):
        iters = s.get("iterations", 20)
        if case == "dc_cpr_fit":  # one search per (steps, CFG) of the grid
            cfgs = [float(c) for c in s["cfg_list"].replace(",", " ").split()]
            grid = [(int(n), c) for n in s["steps_list"].replace(",", " ").split() for c in cfgs]
        else:
            grid = [(s["steps"], float(s["cfg"]))]
        per = [s["reference_steps"] + (iters + 1) * n for n, _ in grid]
        rows = sum(c * s["samples"] * (1 if cfg == 1.0 else 2) for c, (_, cfg) in zip(per, grid, strict=True))
        return sum(per), rows
    if case == "oss_search":
        n, k = s["teacher_steps"], s["steps"]
        calls = n + (k - 1) * (n - k + 1)
        return calls, calls * s["samples"] * guided
    raise KeyError(case)


def kept_bytes(case: str, s: dict, shape: tuple[int, ...]) -> int:
    """Bytes the calibration itself holds at its peak, from the latent shape and the settings (see the code)."""
    n = 1
    for d in shape:
        n *= d
    if case == "v3_statistics":
        # x, the model outputs d_all, the previous outputs and the probes v of all samples (float32); two grid
        # points' float64 moment sums (10 each); l, s, b for every grid point in float64 before the float32 copy
        return 4 * 4 * s["samples"] * n + 2 * 10 * 8 * n + 3 * (s["grid_points"] + 1) * (8 + 4) * n
    if case in ("dc_search", "dc_cpr_fit"):
        # noise and reference (float32), then one autograd pass of the solver: the held model outputs and about
        # four float64 intermediates per step, for the searched batch (the largest step count of a CPR grid)
        steps = max(int(t) for t in str(s.get("steps_list", s.get("steps"))).replace(",", " ").split())
        return 2 * 4 * s["samples"] * n + (steps + 1) * (4 + 4 * 8) * s["samples"] * n
    if case == "oss_search":
        # the teacher trajectory and the two DP levels (current, next), each (teacher_steps + 1) x batch float32,
        # plus the jump candidates (at most 2**24 elements, float32 and their float64 differences)
        return 3 * 4 * (s["teacher_steps"] + 1) * s["samples"] * n + min(1 << 24, s["teacher_steps"] * s["samples"]
                                                                            * n) * 12
    raise KeyError(case)


def estimates(rows: list[dict]) -> list[dict]:
    out = []
    for target, (family, shape) in FULL.items():
        for r in rows:
            if r["family"] != family:
                continue
            row_s = ASSUMED_ROW_SECONDS[target]
            forward = r["settings"].get("derivatives_used") == "forward"
            factor = JVP_FACTOR if r["node"] == "v3_statistics" and forward else 1.0
            seconds = r["rows"] * row_s * factor
            out.append({"model": target, "latent": "x".join(map(str, shape)), "node": r["node"],
                        "setting": r["setting"], "rows": r["rows"], "est_gpu_minutes": round(seconds / 60, 1),
                        "kept_memory_mb": round(kept_bytes(r["node"], r["settings"], shape) / 2**20, 1)})
    return out


def markdown(result: dict) -> str:
    def table(rows, keys):
        lines = ["| " + " | ".join(keys) + " |", "|---" * len(keys) + "|"]
        return lines + ["| " + " | ".join(str(r[k]) for k in keys) + " |" for r in rows]

    fast = "; ".join(f"{k}: {v}" for k, v in FAST.items())
    return "\n".join([
        "# Calibration cost of the calibrated samplers", "",
        "Run: `OMP_NUM_THREADS=1 .venv/bin/python benchmarks/calibration_cost.py`. Each calibration through its "
        f"node class, in a fresh subprocess, on the tiny random-weight models at a {H}x{W} latent (one CPU thread). "
        "rows: latent rows through the network over all calls (a guided call of B samples is 2B rows). "
        "rss_growth_mb: peak RSS of the process after the node minus before it (ru_maxrss, model already loaded). "
        f"Fast settings: {fast}. Flux at CFG 1 (CPR Fit: its cfg_list 3, 6, 9 and steps_list 6, 8, 10); "
        "SD1.5 at the default CFG 7.", "",
        "## Measured on the tiny models", "",
        *table(result["measured"], ["node", "setting", "family", "wall_s", "model_calls", "rows", "rss_growth_mb",
                                     "formula_ok"]),
        "", "## Estimated at full size", "",
        "est_gpu_minutes = rows x assumed seconds per row on an RTX 4090 "
        f"({', '.join(f'{k} {v} s' for k, v in ASSUMED_ROW_SECONDS.items())}; from commonly published it/s "
        f"figures: SD1.5 ~20 it/s and SDXL ~6 it/s with CFG, Flux dev ~1 it/s) x {JVP_FACTOR} for the v3 "
        "statistics when they use forward-mode JVPs (assumed; finite-difference JVPs are "
        "counted as rows). Call and row counts do not depend on the latent size, so SDXL "
        "uses the SD1.5 counts. kept_memory_mb: what the calibration holds besides the model and one batch's "
        "activations (trajectories, moment sums, statistics, search states), computed from the latent shape "
        "and the settings.", "",
        *table(result["estimated"], ["model", "latent", "node", "setting", "rows", "est_gpu_minutes",
                                     "kept_memory_mb"]), ""])


def main():
    if len(sys.argv) == 4:  # a child: node, setting, family
        print("RESULT " + json.dumps(child(*sys.argv[1:])), flush=True)
        return
    if "--report" in sys.argv:  # the tables again from the saved measurements (formulas or assumptions changed)
        saved = json.loads((RESULTS / "calibration_cost.json").read_text())["measured"]
        measured = [r for r in saved if "est." not in str(r["wall_s"])]
        for r in measured:
            r["formula_ok"] = counted_cost(r["node"], r["settings"], r["family"]) == (r["model_calls"], r["rows"])
        return write(measured, any(r["setting"] == "default" for r in measured))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PREPRINT_CALIBRATION_DIR": tempfile.mkdtemp(prefix="calib-cost-")}
    measured = []
    run_defaults = "--defaults" in sys.argv
    cases = NODES
    if "--only" in sys.argv:  # measure one calibration again, keep the others' saved measurements
        cases = [sys.argv[sys.argv.index("--only") + 1]]
        if cases[0] not in NODES:
            sys.exit(f"--only takes one of {list(NODES)}")
        saved = json.loads((RESULTS / "calibration_cost.json").read_text())["measured"]
        measured = [r for r in saved if "est." not in str(r["wall_s"]) and r["node"] != cases[0]
                    and (run_defaults or r["setting"] == "fast")]
    for case in cases:
        for setting in ("default", "fast") if run_defaults else ("fast",):
            for family in FAMILIES:
                t0 = time.perf_counter()
                done = subprocess.run([sys.executable, __file__, case, setting, family], env=env, capture_output=True,
                                      text=True, timeout=600)
                lines = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
                if done.returncode != 0 or not lines:
                    sys.exit(f"{case} {setting} {family} failed:\n{done.stderr[-3000:]}")
                measured.append(json.loads(lines[-1][7:]))
                print(f"{case} {setting} {family}: {measured[-1]} ({time.perf_counter() - t0:.0f} s with boot)",
                      flush=True)
    measured.sort(key=lambda r: list(NODES).index(r["node"]))  # stable: each case's rows stay in run order
    write(measured, run_defaults)


def write(measured: list[dict], run_defaults: bool) -> None:
    formula = []
    if not run_defaults:  # the defaults' calls and rows from the checked cost formulas (not run: see the docstring)
        for case in NODES:
            for family in FAMILIES:
                s = settings_for(case, "default", family)
                if case == "v3_statistics":  # the derivatives "auto" used in the measured run of this family
                    s["derivatives_used"] = next(m["settings"]["derivatives_used"] for m in measured
                                                 if m["node"] == case and m["family"] == family)
                calls, rows = counted_cost(case, s, family)
                fast = next(m for m in measured if m["node"] == case and m["family"] == family)
                # wall time extrapolated by rows from the fast run (the tiny model's cost is per row)
                wall = f"~{rows * fast['wall_s'] / fast['rows']:.0f} (est.)"
                formula.append({"node": case, "setting": "default (formula)", "family": family, "wall_s": wall,
                                "model_calls": calls, "rows": rows, "rss_growth_mb": "-", "formula_ok": "-",
                                "settings": s})
    result = {"latent": [H, W], "assumed_row_seconds_rtx4090": ASSUMED_ROW_SECONDS, "jvp_factor": JVP_FACTOR,
              "fast_settings": FAST, "measured": measured + formula,
              "estimated": estimates(measured + formula)}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "calibration_cost.json").write_text(json.dumps(result, indent=1) + "\n")
    (RESULTS / "calibration_cost.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
