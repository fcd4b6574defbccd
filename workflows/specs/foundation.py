"""Example workflows for the DPM-Solver++ sampler node and the tiny test model."""

import importlib.util
from pathlib import Path

_spec = importlib.util.spec_from_file_location("preprint_workflow_common", Path(__file__).with_name("common.py"))
common = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(common)

_dpmpp = {**common.sd15_base(), **common.custom_sampling(["11", 0], steps=20, cfg=7.0)}
_dpmpp["11"] = {"class_type": "PreprintSamplerDPMSolverPP", "inputs": {"solver": "2M", "lower_order_final": True}}

_tiny = {**common.sd15_base(width=256, height=256), **common.ksampler(sampler_name="preprint_dpmpp_2m", steps=8)}
_tiny["1"] = {"class_type": "PreprintTinyTestModel", "inputs": {"architecture": "sd15", "weights_seed": 0},
              "_meta": {"title": "Tiny untrained test model"}}

WORKFLOWS = {
    "DPM-Solver++ 2M, SD1.5": _dpmpp,
    "Tiny test model smoke test (untrained)": _tiny,
}
