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
