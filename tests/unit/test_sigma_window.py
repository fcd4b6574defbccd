"""The one sigma-interval type: no limit on a negative side, both ends inclusive, bad windows rejected with a
message that says what to do, percent windows through the model's own map, linked inputs (None) let through."""

from __future__ import annotations

import dataclasses
import math
import re

import pytest
import torch

from preprint.utils.sigma_window import ScheduleError, SigmaWindow, check_percents, check_sigmas

SIGMAS = (0.0, 1e-6, 0.03, 0.5, 1.0, 2.0, 14.6, 1e3, 1e9)


def test_the_default_window_is_the_whole_run():
    w = SigmaWindow()
    assert w.unlimited and (w.sigma_start, w.sigma_end) == (-1.0, -1.0)
    assert all(s in w and w.contains(s) for s in SIGMAS)


def test_both_ends_are_inclusive():
    w = SigmaWindow(3.0, 1.0)
    assert w.contains(3.0) and w.contains(1.0) and w.contains(2.0)
    assert not w.contains(math.nextafter(3.0, math.inf))
    assert not w.contains(math.nextafter(1.0, 0.0))
    assert not w.contains(0.0) and not w.contains(14.6)
    point = SigmaWindow(2.0, 2.0)  # equal ends: one noise level, allowed
    assert point.contains(2.0) and not point.contains(math.nextafter(2.0, 0.0))
    assert not point.contains(math.nextafter(2.0, math.inf))


@pytest.mark.parametrize("none", [-1.0, -0.5, -1e-9])
def test_a_negative_bound_is_no_limit_on_that_side(none):
    upper_only = SigmaWindow(2.0, none)
    assert not upper_only.unlimited
    assert [upper_only.contains(s) for s in SIGMAS] == [s <= 2.0 for s in SIGMAS]
    lower_only = SigmaWindow(none, 0.5)
    assert not lower_only.unlimited
    assert [lower_only.contains(s) for s in SIGMAS] == [s >= 0.5 for s in SIGMAS]
    both = SigmaWindow(none, none)
    assert both.unlimited and all(both.contains(s) for s in SIGMAS)


def test_zero_is_a_limit_not_no_limit():
    start_zero = SigmaWindow(0.0, -1.0)  # active at sigma 0 only (the last model call of a run ending there)
    assert not start_zero.unlimited
    assert start_zero.contains(0.0) and not start_zero.contains(1e-6) and not start_zero.contains(1.0)
    end_zero = SigmaWindow(-1.0, 0.0)
    assert not end_zero.unlimited
    assert end_zero.contains(0.0) and end_zero.contains(1e9)


def test_in_is_contains():
    w = SigmaWindow(5.0, 0.3)
    assert [s in w for s in SIGMAS] == [w.contains(s) for s in SIGMAS] == [0.3 <= s <= 5.0 for s in SIGMAS]


@pytest.mark.parametrize("name", ["sigma_start", "sigma_end"])
def test_nan_is_rejected_with_what_to_use_instead(name):
    assert issubclass(ScheduleError, ValueError)  # nodes report it like any other bad value
    with pytest.raises(ScheduleError, match=rf"^{name} is NaN; use a sigma value, or -1 for no limit"):
        SigmaWindow(**{name: float("nan")})
    with pytest.raises(ScheduleError, match=rf"^{name} is NaN"):
        check_sigmas(**{"sigma_start": 1.0, "sigma_end": 0.5, name: float("nan")})


@pytest.mark.parametrize("start,end", [(1.0, 3.0), (0.0, 0.5), (0.5, math.nextafter(0.5, 1.0))])
def test_a_reversed_window_is_rejected_with_the_fix(start, end):
    with pytest.raises(ScheduleError) as info:
        SigmaWindow(start, end)
    msg = str(info.value)
    assert msg.startswith(f"sigma_start ({start}) is below sigma_end ({end})")
    assert "Swap the two values" in msg and "-1 for no limit" in msg
    with pytest.raises(ScheduleError, match="Swap the two values"):
        check_sigmas(start, end)


@pytest.mark.parametrize("start,end", [(3.0, 1.0), (2.0, 2.0), (0.0, 0.0), (-1.0, 3.0), (1.0, -1.0), (-1.0, -1.0)])
def test_windows_that_are_not_reversed_are_accepted(start, end):
    w = SigmaWindow(start, end)
    assert (w.sigma_start, w.sigma_end) == (start, end)
    check_sigmas(start, end)


def test_windows_are_values():
    """Frozen and hashable: a window is the default of other frozen dataclasses (dataclasses refuse an unhashable
    default) and never changes under a run that holds it."""
    w = SigmaWindow(3.0, 1.0)
    assert w == SigmaWindow(3.0, 1.0) and hash(w) == hash(SigmaWindow(3.0, 1.0)) and w != SigmaWindow(3.0, 0.5)
    with pytest.raises(dataclasses.FrozenInstanceError):
        w.sigma_start = 5.0  # type: ignore[misc]


def test_from_percents_maps_both_ends_through_the_given_function():
    calls = []

    def percent_to_sigma(p):  # a model's map: falls from sigma_max at 0 to 0 at 1; returns a tensor, as some do
        calls.append(p)
        return torch.tensor(14.6 * (1.0 - p) ** 3)

    w = SigmaWindow.from_percents(percent_to_sigma, 0.2, 0.6)
    assert calls == [0.2, 0.6]
    assert type(w.sigma_start) is float and type(w.sigma_end) is float
    assert w.sigma_start == pytest.approx(14.6 * 0.8**3, rel=1e-6)
    assert w.sigma_end == pytest.approx(14.6 * 0.4**3, rel=1e-6)
    assert w.contains(14.6 * 0.5**3) and not w.contains(14.6 * 0.1**3) and not w.contains(14.6 * 0.9**3)
    full = SigmaWindow.from_percents(lambda p: 14.6 * (1.0 - p), 0.0, 1.0)
    assert (full.sigma_start, full.sigma_end) == (14.6, 0.0)
    assert full.contains(14.6) and full.contains(0.0) and not full.contains(14.7)


@pytest.mark.parametrize("start,end,match", [
    (0.7, 0.2, r"^start_percent \(0.7\) is after end_percent \(0.2\).*Swap the two values"),
    (-0.1, 0.5, r"^start_percent is -0.1; it must lie in \[0, 1\]"),
    (0.1, 1.5, r"^end_percent is 1.5; it must lie in \[0, 1\]"),
])
def test_from_percents_rejects_bad_percents(start, end, match):
    with pytest.raises(ScheduleError, match=match):
        SigmaWindow.from_percents(lambda p: 10.0 * (1.0 - p), start, end)


@pytest.mark.parametrize("start,end", [(0.0, 1.0), (0.0, 0.0), (1.0, 1.0), (0.3, 0.3), (0.25, 0.75)])
def test_check_percents_accepts_the_closed_unit_range_in_order(start, end):
    check_percents(start, end)


@pytest.mark.parametrize("name,value", [
    ("start_percent", -1e-9), ("start_percent", -1.0), ("start_percent", float("nan")),
    ("end_percent", math.nextafter(1.0, 2.0)), ("end_percent", 2.0), ("end_percent", float("nan")),
    ("end_percent", -0.5),
])
def test_check_percents_names_the_input_out_of_range(name, value):
    values = {"start_percent": 0.0, "end_percent": 1.0, name: value}
    with pytest.raises(ScheduleError, match=rf"^{name} is {re.escape(str(value))}; it must lie in \[0, 1\] \(0 = first "
                                            r"step, 1 = end of the run\)"):
        check_percents(**values)


def test_check_percents_rejects_a_reversed_window():
    with pytest.raises(ScheduleError, match=r"^start_percent \(0.6\) is after end_percent \(0.2\), so the window "
                                            r"would never be active.*Swap the two values"):
        check_percents(0.6, 0.2)
    with pytest.raises(ScheduleError, match="after end_percent"):
        check_percents(math.nextafter(0.5, 1.0), 0.5)


def test_a_linked_input_is_checked_later():
    """None stands for an input wired from another node: nothing to check yet on that side, the other side's range
    still is."""
    for start, end in ((None, None), (None, 0.0), (None, 1.0), (0.0, None), (1.0, None)):
        check_percents(start, end)
    with pytest.raises(ScheduleError, match="^start_percent is 1.5"):
        check_percents(1.5, None)
    with pytest.raises(ScheduleError, match="^end_percent is -0.1"):
        check_percents(None, -0.1)
    for start, end in ((None, None), (None, 3.0), (3.0, None), (None, -1.0)):
        check_sigmas(start, end)
