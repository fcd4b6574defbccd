"""Node inputs, outputs and validation that several families share, written once.

A node's ``validate_inputs`` runs in ComfyUI's prompt validation, before anything is queued, so the editor
marks the node and the HTTP ``/prompt`` call answers 400. It must name the inputs it checks and take no
``**kwargs``: ComfyUI skips its own range and option checks for every input a ``validate_inputs`` accepts, and
for all of them when it takes ``**kwargs``.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable

from comfy_api.latest import io

from ..utils.sigma_window import ScheduleError, check_percents, check_sigmas
from ._host import validation_message

# Newer ComfyUI releases add search aliases to a node's schema and an "advanced" flag to its inputs (the editor
# folds those widgets away); 0.3.64 has neither, so both are set only where the host knows them.
_SCHEMA_ALIASES = "search_aliases" in {f.name for f in dataclasses.fields(io.Schema)}
_ADVANCED = "advanced" in inspect.signature(io.Float.Input.__init__).parameters


class PreprintNode(io.ComfyNode):
    """Base of the pack's nodes: ``NAME`` is the display name, written once and used by the schema and by every
    error the node raises; ``ALIASES`` are the words users search for it by."""

    NAME = ""
    ALIASES: tuple[str, ...] = ()
    WINDOW = "sigma window"  # what the node calls its sigma window, in messages

    @classmethod
    def schema(cls, **fields) -> io.Schema:
        """The node's ``io.Schema`` under its display name, with its search aliases where the host has them."""
        if cls.ALIASES and _SCHEMA_ALIASES:
            fields["search_aliases"] = list(cls.ALIASES)
        return io.Schema(display_name=cls.NAME, **fields)

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


def advanced(widget):
    """A secondary widget: the editors that know the flag show it folded away, so the node opens compact."""
    if _ADVANCED:
        widget.advanced = True
    return widget


def model_input(accepts: str) -> io.Model.Input:
    return io.Model.Input("model", tooltip=f"{accepts} It is cloned, never changed.")


def calibration_inputs(purpose: str, latent: bool = True) -> list:
    """The inputs every calibration node opens with: the model it calibrates, the conditioning of its samples and
    (with ``latent``) a latent of the size the user will sample."""
    inputs = [io.Model.Input("model", tooltip=f"The model to {purpose} (LoRAs and patches included). It is not "
                                              "changed."),
              io.Conditioning.Input("positive", tooltip="Positive conditioning of the search samples."),
              io.Conditioning.Input("negative", tooltip="Negative conditioning of the search samples.")]
    if latent:
        inputs.append(io.Latent.Input("latent_image", tooltip="A latent of the size you will sample (its shape only)."))
    return inputs


def model_output(tooltip: str) -> io.Model.Output:
    return io.Model.Output(tooltip=tooltip)


def sigma_window_inputs(verb: str = "Guide") -> list:
    """``sigma_start`` / ``sigma_end``: the technique acts only on steps with sigma_end <= sigma <= sigma_start
    (``utils.sigma_window.SigmaWindow``; -1 is no limit on that side)."""
    return [
        advanced(io.Float.Input("sigma_start", default=-1.0, min=-1.0, max=10000.0, step=0.01, round=0.001,
                                tooltip=f"{verb} only while sigma <= this value (-1: from the first step).")),
        advanced(io.Float.Input("sigma_end", default=-1.0, min=-1.0, max=10000.0, step=0.01, round=0.001,
                                tooltip=f"{verb} only while sigma >= this value (-1: to the last step).")),
    ]


def percent_window_inputs(start_tooltip: str, end_tooltip: str) -> list:
    """``start_percent`` / ``end_percent``: a window as fractions of the run (0 = first step, 1 = end)."""
    return [
        advanced(io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.01, tooltip=start_tooltip)),
        advanced(io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.01, tooltip=end_tooltip)),
    ]


def rescale_input() -> io.Float.Input:
    return advanced(io.Float.Input("rescale", default=0.0, min=0.0, max=1.0, step=0.01,
                                   tooltip="Match the guided prediction's standard deviation to the positive "
                                           "prediction's and blend by this amount (0 = off), against over-saturation "
                                           "at high scales."))


