"""Example workflows for the sampler family: DPM-Solver++ 2S / 3S, DEIS, momentum solvers, EVODiff."""

import importlib.util
from pathlib import Path

_spec = importlib.util.spec_from_file_location("preprint_workflow_common", Path(__file__).with_name("common.py"))
common = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(common)


def _custom(node: dict, title: str, steps: int, cfg: float = 7.0, scheduler: str = "karras") -> dict:
    prompt = {**common.sd15_base(), **common.custom_sampling(["11", 0], steps=steps, cfg=cfg, scheduler=scheduler)}
    prompt["11"] = {**node, "_meta": {"title": title}}
    return prompt


_dpmpp_3s = _custom({"class_type": "PreprintSamplerDPMSolverPP",
                     "inputs": {"solver": "3S", "lower_order_final": True, "flow_lambda": "auto",
                                "dynamic_thresholding": False, "threshold_percentile": 0.995}},
                    "DPM-Solver++ 3S (3 model calls per step)", steps=7)

_deis = _custom({"class_type": "PreprintSamplerDEIS",
                 "inputs": {"order": 3, "poly_space": "lambda", "lower_order_final": True}},
                "DEIS tAB, order 3, weights on this model's schedule", steps=10)

_ghvb = _custom({"class_type": "PreprintSamplerMomentum",
                 "inputs": {"solver": "plms", "momentum": "ghvb", "order": 3, "beta": 0.8}},
                "GHVB momentum (order 2.8), few steps at high CFG", steps=8, cfg=9.0)

_hb = _custom({"class_type": "PreprintSamplerMomentum",
               "inputs": {"solver": "dpmpp_2m", "momentum": "hb", "order": 2, "beta": 0.8}},
              "DPM-Solver++ 2M with heavy-ball momentum", steps=15, cfg=9.0)

_evodiff = _custom({"class_type": "PreprintSamplerEVODiff", "inputs": {"lower_order_final": True}},
                   "EVODiff (variance-optimised multistep)", steps=15)

_ksampler_names = {**common.sd15_base(), **common.ksampler(sampler_name="preprint_ghvb", steps=8, cfg=7.0)}
_ksampler_names["7"]["_meta"] = {"title": "Stock KSampler with a Preprint sampler name (preprint_ghvb)"}

WORKFLOWS = {
    "DPM-Solver++ 3S, SD1.5": _dpmpp_3s,
    "DEIS on the model's own schedule, SD1.5": _deis,
    "GHVB momentum sampler at 8 steps, SD1.5": _ghvb,
    "DPM-Solver++ 2M with heavy-ball momentum, SD1.5": _hb,
    "EVODiff, SD1.5": _evodiff,
    "Preprint sampler from the stock KSampler, SD1.5": _ksampler_names,
}

DPMPP = ("Paper: Lu et al., DPM-Solver++: Fast Solver for Guided Sampling of Diffusion Probabilistic Models, "
         "arXiv:2211.01095.")
MOMENTUM = ("Paper: Wizadwongsa et al., Diffusion Sampling with Momentum for Mitigating Divergence Artifacts, "
            "arXiv:2307.11118.")

NOTES: dict[str, str] = {
    "DPM-Solver++ 3S, SD1.5": (
        "Singlestep third-order DPM-Solver++ takes three model calls per step, so these 7 steps cost what 21 steps "
        "of a one-call solver cost. Try solver first: compare 2M at 21 steps on the BasicScheduler, the same number "
        "of model calls. " + DPMPP),
    "DEIS on the model's own schedule, SD1.5": (
        "DEIS extrapolates the model's noise predictions with a polynomial and integrates it exactly, with weights "
        "computed on this model's own sigma list, here order 3 at 10 steps. Try poly_space first: lambda (log-SNR) "
        "was the most accurate on the pack's benchmark, t is the paper's tAB and rho its rhoAB. Paper: Zhang and "
        "Chen, Fast Sampling of Diffusion Models with Exponential Integrator, arXiv:2204.13902."),
    "GHVB momentum sampler at 8 steps, SD1.5": (
        "Generalised heavy-ball momentum on PLMS damps the divergence artifacts that high-order solvers show with "
        "few steps and strong guidance, here 8 steps at CFG 9. Try beta first: 1 is plain PLMS, smaller values "
        "damp more; order 3 with beta 0.8 is the paper's fractional order 2.8. " + MOMENTUM),
    "DPM-Solver++ 2M with heavy-ball momentum, SD1.5": (
        "Heavy-ball momentum on DPM-Solver++ 2M at 15 steps and CFG 9 damps the oscillation behind divergence "
        "artifacts; it does not make the solution more accurate. Try beta first: 1 is plain DPM-Solver++ 2M, lower "
        "values damp more, for when high CFG with few steps shows artifacts. " + MOMENTUM),
    "EVODiff, SD1.5": (
        "EVODiff is a second-order multistep solver that picks its difference weights per sample and channel to "
        "reduce the variance of each update, at one model call per step. Try steps on the BasicScheduler first, and "
        "compare with DPM-Solver++ 2M at the same count (on the pack's exact-score benchmark 2M was the more "
        "accurate). Paper: Li, Chen and Zeng, EVODiff: Entropy-aware Variance Optimized Diffusion Inference, "
        "arXiv:2509.26096."),
    "Preprint sampler from the stock KSampler, SD1.5": (
        "Preprint's solvers are also in the stock KSampler's sampler_name list with a preprint_ prefix; here "
        "preprint_ghvb, the momentum solver at order 2.8, runs 8 steps. Try sampler_name first: preprint_dpmpp_2m, "
        "preprint_deis and preprint_evodiff are there too. " + MOMENTUM),
}
