"""Node inputs, outputs and validation that several families share, written once.

A node's ``validate_inputs`` runs in ComfyUI's prompt validation, before anything is queued, so the editor
marks the node and the HTTP ``/prompt`` call answers 400. It must name the inputs it checks and take no
``**kwargs``: ComfyUI skips its own range and option checks for every input a ``validate_inputs`` accepts, and
for all of them when it takes ``**kwargs``.
"""

from __future__ import annotations

from collections.abc import Callable

from comfy_api.latest import io

from ..utils.sigma_window import ScheduleError, check_percents, check_sigmas
from ._host import validation_message


class PreprintNode(io.ComfyNode):
    """Base of the pack's nodes: ``NAME`` is the display name, written once and used by the schema and by every
    error the node raises."""

    NAME = ""
    WINDOW = "sigma window"  # what the node calls its sigma window, in messages

    @classmethod
    def check(cls, check: Callable[[], object]) -> bool | str:
        """For ``validate_inputs``: True, or the ValueError ``check`` raises prefixed with the display name."""
        return validation_message(cls.NAME, check)

    @classmethod
    def error(cls, message: str) -> ValueError:
        return ValueError(f"{cls.NAME}: {message}")

    @classmethod
    def check_widgets(cls, **values) -> bool | str:
        """For ``validate_inputs``: each named widget value against the node's own schema (range, options), the
        window pairs it holds (``sigma_start`` / ``sigma_end``, ``start_percent`` / ``end_percent``), then
        :meth:`check_values`. None is a linked input, checked when the node runs."""
        def check() -> None:
            widgets = {w.id: w for w in cls.define_schema().inputs}
            given = {k: v for k, v in values.items() if v is not None}
            for name, value in given.items():
                _check_widget(widgets[name], value)
            try:
                check_sigmas(given.get("sigma_start"), given.get("sigma_end"))
            except ScheduleError as e:
                raise ScheduleError(f"{cls.WINDOW}: {e}") from None
            check_percents(given.get("start_percent"), given.get("end_percent"))
            cls.check_values(**given)
        return cls.check(check)

    @classmethod
    def check_values(cls, **values) -> None:
        """Checks beyond each widget's own range; ``values`` holds only the inputs given as widget values."""


def _check_widget(widget, value) -> None:
    options = getattr(widget, "options", None)
    if options is not None:
        if value not in options:
            raise ValueError(f"{widget.id} = {value!r} is not one of its options: {', '.join(map(str, options))}.")
        return
    low, high = getattr(widget, "min", None), getattr(widget, "max", None)
    if (low is not None and not value >= low) or (high is not None and not value <= high):  # NaN fails too
        raise ValueError(f"{widget.id} = {value} is outside its range [{low}, {high}].")


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


