"""Block-change profiles (caching/block_profile.py): profile file names, the architecture fingerprint, the
piecewise-linear rate and its integral, saving / loading with clear errors, and the calibrator that turns
measured changes into a profile on a common progress grid."""

from __future__ import annotations

import hashlib
import json
import math

import pytest
import torch

from preprint.caching.block_profile import Calibrator, Profile, ProfileError, model_fingerprint, profile_file_name

FORMAT = {"format": "preprint-block-cache-profile", "version": 1}


# -- profile names ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,expected", [
    ("block_cache_profile", "block_cache_profile.json"),
    ("block_cache_profile.json", "block_cache_profile.json"),  # the suffix is not doubled
    ("a.json", "a.json"),
    ("  sdxl base v1.2.json ", "sdxl base v1.2.json"),
    ("my-profile_1.2", "my-profile_1.2.json"),
])
def test_profile_file_name_is_name_dot_json(name, expected):
    """A plain name maps to NAME.json; a name already ending in .json keeps a single suffix."""
    assert profile_file_name(name) == expected


@pytest.mark.parametrize("name", ["../evil", "sub/name", "sub\\name", ".hidden", ".json", "", "a:b", "x" * 121])
def test_profile_file_name_refuses_anything_but_a_plain_name(name):
    """Folders, parent references, hidden files and empty names would leave the profile folder: refused."""
    with pytest.raises(ProfileError, match="not a plain file name"):
        profile_file_name(name)


# -- fingerprint -----------------------------------------------------------------------------------------------
def test_fingerprint_is_a_stable_16_hex_digit_hash_of_class_and_parameter_shapes():
    """The fingerprint saved in every profile is the first 16 hex digits of SHA-256 over the class name and each
    parameter's ``name:shape;``: profiles saved before keep matching the same architecture."""
    h = hashlib.sha256(b"Linear")
    h.update(b"weight:(4, 3);")
    h.update(b"bias:(4,);")
    fp = model_fingerprint(torch.nn.Linear(3, 4))
    assert fp == h.hexdigest()[:16]
    assert len(fp) == 16 and int(fp, 16) >= 0


# -- rate and its integral -------------------------------------------------------------------------------------
def _profile() -> Profile:
    return Profile("fp", "toy", [0.25, 0.5, 1.0], {"b": [1.0, 3.0, 2.0]})


def test_rate_is_piecewise_linear_and_held_beyond_the_grid():
    """Between knots the rate is interpolated linearly; before the first / after the last knot it is held."""
    p = _profile()
    assert p.rate("b", 0.375) == pytest.approx(2.0)  # halfway between 1 and 3
    assert p.rate("b", 0.75) == pytest.approx(2.5)  # halfway between 3 and 2 (a knot away from 0)
    assert p.rate("b", 0.625) == pytest.approx(2.75)
    assert p.rate("b", 0.0) == 1.0 and p.rate("b", 0.25) == 1.0
    assert p.rate("b", 1.0) == 2.0 and p.rate("b", 1.5) == 2.0  # the last knot's rate, not the middle one's


def test_rate_at_the_first_knot_is_that_knots_rate_even_next_to_a_never_reuse_rate():
    """At a knot the rate is the knot's own value: an infinite ("never reuse") rate at the next knot does not
    leak into it (0 * inf would make it NaN)."""
    p = Profile("fp", "toy", [0.0, 0.5, 1.0], {"b": [0.5, math.inf, 1.0]})
    assert p.rate("b", 0.0) == 0.5
    assert p.rate("b", 1.0) == 1.0


def test_accumulated_change_integrates_a_tent_exactly():
    """The trapezoid rule over eighths of the interval is exact for a rate whose kink lies on an eighth: a tent
    0 -> 1 -> 0 over the whole run has area 1/2, and its middle half has area 3/8."""
    p = Profile("fp", "toy", [0.0, 0.5, 1.0], {"b": [0.0, 1.0, 0.0]})
    assert p.accumulated("b", 0.0, 1.0) == pytest.approx(0.5, rel=0, abs=1e-12)
    assert p.accumulated("b", 0.25, 0.75) == pytest.approx(0.375, rel=0, abs=1e-12)


def test_no_progress_accumulates_no_change_whatever_the_rate():
    """An empty or backward stretch of progress predicts zero change, even for an unmeasured block (rate inf)."""
    p = _profile()
    assert p.accumulated("b", 0.5, 0.5) == 0.0
    assert p.accumulated("b", 0.7, 0.3) == 0.0
    assert p.accumulated("missing", 0.5, 0.5) == 0.0


def test_an_unmeasured_block_accumulates_infinite_change():
    """A block the profile has no rate for is never reused: over any forward stretch its expected change is
    infinite (not NaN, which would compare false against every threshold)."""
    p = _profile()
    assert p.accumulated("missing", 0.2, 0.6) == math.inf
    hole = Profile("fp", "toy", [0.0, 1.0], {"b": [1.0, math.inf]})  # a hand-made profile with a 'never' knot
    assert p.accumulated("b", 0.2, 0.6) < math.inf and hole.accumulated("b", 0.0, 1.0) == math.inf


# -- saving and loading ----------------------------------------------------------------------------------------
def test_save_creates_missing_folders_and_round_trips(tmp_path):
    """Saving into a profile folder that does not exist yet (nor its parent) creates it."""
    p = _profile()
    path = p.save(tmp_path / "output" / "preprint_cache_profiles" / "x.json")
    assert path.is_file()
    q = Profile.load(path)
    assert q.progress == p.progress and q.rates == p.rates and q.fingerprint == "fp"


def test_steps_default_to_zero_when_not_recorded(tmp_path):
    """The calibration step count is 0 ("not recorded") when a profile is made without one or a file lacks it."""
    assert Profile("fp", "toy", [0.0, 1.0], {"b": [1.0, 1.0]}).steps == 0
    f = tmp_path / "p.json"
    f.write_text(json.dumps({**FORMAT, "fingerprint": "a", "progress": [0, 1], "rates": {"b": [1, 2]}}))
    assert Profile.load(f).steps == 0
    assert json.loads(Profile("fp", "toy", [0.0], {}).save(tmp_path / "q.json").read_text())["steps"] == 0


@pytest.mark.parametrize("fields", [
    {"fingerprint": "a", "rates": {"b": [1.0]}},  # no progress grid (KeyError)
    {"progress": [0.0], "rates": {"b": [1.0]}},  # no fingerprint (KeyError)
    {"fingerprint": "a", "progress": None, "rates": {"b": [1.0]}},  # not a list (TypeError)
    {"fingerprint": "a", "progress": [0.0], "rates": {"b": None}},  # not a list (TypeError)
    {"fingerprint": "a", "progress": ["early"], "rates": {"b": [1.0]}},  # not a number (ValueError)
    {"fingerprint": "a", "progress": [0.0], "rates": {"b": [1.0]}, "steps": "many"},  # ValueError
])
def test_malformed_fields_are_profile_errors(fields):
    """Missing or mistyped fields raise ProfileError (the node turns it into a message), never a bare
    KeyError / TypeError / ValueError."""
    with pytest.raises(ProfileError, match="malformed") as info:
        Profile.from_json({**FORMAT, **fields})
    assert type(info.value) is ProfileError


@pytest.mark.parametrize("grid", [[], [1.0, 0.0], [0.0, 0.5, 0.5, 1.0], [0.0, 1.0, 0.5]])
def test_progress_grid_must_be_nonempty_and_strictly_increasing(grid):
    """An empty grid, a repeated point or a step back anywhere in the grid is refused."""
    data = {**FORMAT, "fingerprint": "a", "progress": grid, "rates": {"b": [1.0] * len(grid)} if grid else {}}
    with pytest.raises(ProfileError, match="non-empty and increasing"):
        Profile.from_json(data)
    ok = {**FORMAT, "fingerprint": "a", "progress": [0.0, 0.5, 1.0], "rates": {"b": [1.0, 2.0, 3.0]}}
    assert Profile.from_json(ok).progress == [0.0, 0.5, 1.0]


# -- calibration -----------------------------------------------------------------------------------------------
def test_calibrator_samples_the_rate_at_the_interval_midpoint():
    """A change of 0.1 over progress 0 -> 0.5 is a rate of 0.2, placed at the midpoint 0.25."""
    cal = Calibrator()
    cal.add("b", 0.0, 0.5, 0.1)
    prof = cal.profile("fp", "toy", 2)
    assert prof.progress == [0.25]
    assert prof.rates == {"b": [pytest.approx(0.2)]}
    assert prof.steps == 2 and prof.fingerprint == "fp"


def test_calibrator_ignores_empty_backward_and_nonfinite_intervals():
    """Intervals without forward progress (a repeated or restarted noise level) and infinite / NaN changes
    carry no rate; only the valid interval enters the profile, and a run with none has no profile."""
    cal = Calibrator()
    cal.add("b", 0.5, 0.5, 0.1)
    cal.add("b", 0.75, 0.5, 0.1)
    cal.add("b", 0.0, 0.5, math.inf)
    cal.add("b", 0.0, 0.5, math.nan)
    with pytest.raises(ProfileError, match="no block changes"):
        cal.profile("fp", "toy", 4)
    cal.add("b", 0.5, 1.0, 0.2)
    prof = cal.profile("fp", "toy", 4)
    assert prof.progress == [0.75] and prof.rates == {"b": [pytest.approx(0.4)]}


def test_calibrated_rates_at_their_own_grid_points_are_the_measured_ones():
    """Measured at the midpoints of six equal steps (1/12, 3/12, ...), a block keeps exactly its measured rates
    on the saved grid, with no interpolation drift; chunks measured at the same interval are averaged."""
    rates = [1.0, 2.0, 4.0, 3.0, 5.0, 6.0]
    cal = Calibrator()
    for k, r in enumerate(rates):
        p0, p1 = k / 6, (k + 1) / 6
        cal.add("b", p0, p1, r * (p1 - p0))
        cal.add("c", p0, p1, (r - 0.5) * (p1 - p0))  # two chunks of block c: mean r
        cal.add("c", p0, p1, (r + 0.5) * (p1 - p0))
    prof = cal.profile("fp", "toy", 6)
    assert prof.progress == pytest.approx([(2 * k + 1) / 12 for k in range(6)], rel=0, abs=5e-7)
    assert prof.rates["b"] == rates
    assert prof.rates["c"] == rates


def test_calibrated_rates_are_stored_to_eight_decimals():
    """Rates are kept to 8 decimals (a small file; 1e-8 is far below any usable threshold): 1/3 -> 0.33333333."""
    cal = Calibrator()
    cal.add("b", 0.0, 0.5, 1 / 6)
    assert cal.profile("fp", "toy", 2).rates["b"] == [0.33333333]
