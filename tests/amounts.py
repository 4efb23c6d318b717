"""Hypothesis strategies for an asset's amounts in a state, shared by the test modules."""

from __future__ import annotations

from hypothesis import strategies as st

from channel.state import UINT256_MAX


@st.composite
def amounts(draw: st.DrawFn) -> tuple[int, int, int]:
    """``(balance_0, balance_1, locked)``: each a uint256 and so their sum, as the
    adjudicator requires (it adds them up); often near the top of the range."""
    b0 = draw(st.integers(min_value=0, max_value=UINT256_MAX))
    b1 = draw(st.integers(min_value=0, max_value=UINT256_MAX - b0))
    return b0, b1, draw(st.integers(min_value=0, max_value=UINT256_MAX - b0 - b1))
