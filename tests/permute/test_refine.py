"""Greedy swaps between groups (`permute.refine`) after sorting."""

from __future__ import annotations

import numpy as np
import pytest

from pqjax import formats, permute
from pqjax.permute.refine import pair_mask, proxy_error, refine_order
from tests.permute.synthetic import outlier_layer

FMT = formats.get("int4", group=16)


@pytest.fixture(scope="module")
def layer():
    x, w, _ = outlier_layer(0, tokens=128, d_in=128, d_out=32, frac=0.1, ratio=8.0, w_pow=0.3)
    return x, w, permute.search(x, w, weights=FMT, acts=FMT)


def test_refine_lowers_the_proxy_and_the_measured_error(layer):
    x, w, res = layer
    start = res.candidate_perm
    new = np.asarray(refine_order(x, w, start, FMT, FMT, ((128, 128),), rounds=6))
    assert sorted(new.tolist()) == list(range(128))
    p0, p1 = proxy_error(x, w, start, FMT, FMT), proxy_error(x, w, new, FMT, FMT)
    assert p1 < p0  # strict: some swap lowered it (only strict gains are applied)
    e0 = permute.layer_errors(x, [w], start, FMT, FMT)[0]
    e1 = permute.layer_errors(x, [w], new, FMT, FMT)[0]
    print("proxy", p0, "->", p1, "error", e0, "->", e1)
    assert e1 < e0


def test_refine_keeps_channels_inside_their_segment_blocks(layer):
    x, w, _ = layer
    segments = ((64, 32), (64, 64))  # two 32-channel heads, then a free 64 block
    start = permute.order_from_scores(np.arange(128.0)[::-1].copy(), segments)
    new = np.asarray(refine_order(x, w, start, FMT, FMT, segments, rounds=6))
    for lo, hi in ((0, 32), (32, 64), (64, 128)):
        assert sorted(new[lo:hi].tolist()) == list(range(lo, hi))
    assert pair_mask(128, 16, segments, 0).tolist() == [True, True, True, True]
    assert pair_mask(128, 16, segments, 1).tolist() == [False, False, True]  # (5, 6) only


def test_search_scores_the_refined_order_under_the_acceptance_rule(layer):
    x, w, res = layer
    ref = permute.search(x, w, weights=FMT, acts=FMT, refine=6)
    assert [t[1] for t in ref.table] == ["identity", "joint_second_moment", "refine"]
    final = ref.err_permuted if ref.accepted else ref.err_identity
    assert final <= (res.err_permuted if res.accepted else res.err_identity)
    e_refine = ref.table[2][3]
    assert ref.criterion == "refine" and final == pytest.approx(e_refine, rel=1e-6)
    assert permute.layer_errors(x, [w], ref.perm, FMT, FMT)[0] == pytest.approx(final, rel=1e-5)
