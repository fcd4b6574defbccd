"""Momentum samplers (samplers/momentum.py), edges: the fractional-order convention below order 1."""

from preprint.samplers.momentum import split_fractional_order


def test_an_order_below_one_is_first_order_with_its_fraction_as_beta():
    """The paper's convention (order 3.7 = AB order 4 with beta 0.7) taken below 1: a positive order never becomes
    order 0, down to the smallest fraction the cut-off keeps (1e-9 itself)."""
    assert split_fractional_order(0.5) == (1, 0.5)
    assert split_fractional_order(1e-9) == (1, 1e-9)
    assert split_fractional_order(3.0) == (3, 1.0)
