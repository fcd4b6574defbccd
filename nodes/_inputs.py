"""Node inputs, outputs and validation that several families share, written once.

A node's ``validate_inputs`` runs in ComfyUI's prompt validation, before anything is queued, so the editor
marks the node and the HTTP ``/prompt`` call answers 400. It must name the inputs it checks and take no
``**kwargs``: ComfyUI skips its own range and option checks for every input a ``validate_inputs`` accepts, and
for all of them when it takes ``**kwargs``.
"""

from __future__ import annotations

from collections.abc import Callable

from comfy_api.latest import io

from ..utils.sigma_window import check_percents, check_sigmas


class PreprintNode(io.ComfyNode):
    """Base of the pack's nodes: ``NAME`` is the display name, written once and used by the schema and by every
    error the node raises."""

    NAME = ""

    @classmethod
    def check(cls, check: Callable[[], object]) -> bool | str:
        """For ``validate_inputs``: True, or the ValueError ``check`` raises prefixed with the display name."""
        try:
            check()
        except ValueError as e:
            return f"{cls.NAME}: {e}"
        return True

    @classmethod
    def error(cls, message: str) -> ValueError:
        return ValueError(f"{cls.NAME}: {message}")


def model_input(accepts: str) -> io.Model.Input:
    return io.Model.Input("model", tooltip=f"{accepts} It is cloned, never changed.")


def model_output(tooltip: str) -> io.Model.Output:
    return io.Model.Output(tooltip=tooltip)


def sigma_window_inputs(verb: str = "Guide") -> list:
    """``sigma_start`` / ``sigma_end``: the technique acts only on steps with sigma_end <= sigma <= sigma_start
    (``utils.sigma_window.SigmaWindow``; -1 is no limit on that side)."""
    return [
        io.Float.Input("sigma_start", default=-1.0, min=-1.0, max=10000.0, step=0.01, round=0.001,
                       tooltip=f"{verb} only while sigma <= this value (-1: from the first step)."),
        io.Float.Input("sigma_end", default=-1.0, min=-1.0, max=10000.0, step=0.01, round=0.001,
                       tooltip=f"{verb} only while sigma >= this value (-1: to the last step)."),
    ]


def percent_window_inputs(start_tooltip: str, end_tooltip: str) -> list:
    """``start_percent`` / ``end_percent``: a window as fractions of the run (0 = first step, 1 = end)."""
    return [
        io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.01, tooltip=start_tooltip),
        io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.01, tooltip=end_tooltip),
    ]


def rescale_input() -> io.Float.Input:
    return io.Float.Input("rescale", default=0.0, min=0.0, max=1.0, step=0.01,
                          tooltip="Match the guided prediction's standard deviation to the positive prediction's and "
                                  "blend by this amount (0 = off), against over-saturation at high scales.")


def check_range(name: str, value, low: float, high: float) -> None:
    """The widget's own range, for an input a ``validate_inputs`` names (ComfyUI then leaves it unchecked)."""
    if value is not None and not low <= value <= high:
        raise ValueError(f"{name} is {value}; it must lie in [{low}, {high}].")


def check_sigma_window(sigma_start, sigma_end) -> None:
    check_range("sigma_start", sigma_start, -1.0, 10000.0)
    check_range("sigma_end", sigma_end, -1.0, 10000.0)
    check_sigmas(sigma_start, sigma_end)


def check_percent_window(start_percent, end_percent) -> None:
    check_percents(start_percent, end_percent)
