"""The joint (rotation, order) choice of `permute.search(rotate=(None, ...))`."""

from __future__ import annotations

import numpy as np
import pytest

from pqjax import formats, permute, rotate
from tests.permute.synthetic import outlier_layer


def err(x, w, perm, fmt, name=None) -> float:
    return permute.layer_errors(x, [w], perm, fmt, fmt, name)[0]


def test_a_random_rotation_that_hurts_is_not_kept():
    """NVFP4 with 10x channels and uncompensated weights: a signed (random) 16-block Hadamard
    raises the error over RTN (its E4M3 scales per 16 already isolate the loud channels), so
    the joint choice keeps no rotation, with or without an order."""
    fmt = formats.get("nvfp4")
    x, w, _ = outlier_layer(0, tokens=256, d_in=256, d_out=64, ratio=10.0, w_pow=0.0)
    bad = "hadamard:16:seed7"
    ident = np.arange(256)
    assert err(x, w, ident, fmt, bad) > 1.02 * err(x, w, ident, fmt)  # it does hurt
    for criterion in ("identity", "joint_second_moment"):
        res = permute.search(x, w, weights=fmt, acts=fmt, criterion=criterion,
                             rotate=(None, bad))
        assert res.rotate is None, res.table
        assert res.err_identity == pytest.approx(err(x, w, ident, fmt), rel=1e-5)
        final = res.err_permuted if res.accepted else res.err_identity
        assert final <= res.err_identity
        # the rotated pairs were scored, and lost
        rotated = [e for r, _, _, e, _ in res.table if r == bad]
        assert len(rotated) == 2  # identity order and the criterion's order
        assert min(rotated) > final


def test_a_rotation_that_helps_is_kept_and_scored_exactly():
    """INT4 g64, 5% loud channels: the in-group rotation lowers the error (QuaRot's case), so
    a rotation is kept; every table entry is the error of its pair, and the kept pair is the
    best one that no consumer pays for."""
    fmt = formats.get("int4", group=64)
    x, w, _ = outlier_layer(0, tokens=256, d_in=256, d_out=64, ratio=10.0, w_pow=0.0)
    cands = rotate.candidates(64, 256)
    assert cands == (None, "hadamard:64", "hadamard:128", "hadamard:256", "regular_hadamard:64",
                     "regular_hadamard:256")
    res = permute.search(x, w, weights=fmt, acts=fmt, rotate=cands)
    assert res.accepted and res.rotate is not None, res.table
    assert len(res.table) == len(cands) * 2  # identity + one criterion per rotation
    for r, crit, _, e, _ in res.table:
        perm = np.arange(256)
        if crit != "identity":  # the sorted order: the one the search returned for that pair
            if (r, crit) != (res.rotate, res.criterion):
                continue
            perm = res.perm
        assert e == pytest.approx(err(x, w, perm, fmt, r), rel=1e-5), (r, crit)
    final = err(x, w, res.perm, fmt, res.rotate)
    assert final == pytest.approx(res.err_permuted, rel=1e-5)
    assert final == pytest.approx(min(e for *_, e, q in res.table if q), rel=1e-6)
    # never worse than the order alone (PermuQuant) or the in-group rotation alone (Hadamard)
    pq = permute.search(x, w, weights=fmt, acts=fmt)
    assert final <= (pq.err_permuted if pq.accepted else pq.err_identity)
    assert final <= err(x, w, np.arange(256), fmt, "hadamard:64")


def test_a_pair_no_consumer_pays_for():
    """Two consumers: the kept pair leaves each consumer's error at most RTN's."""
    fmt = formats.get("nvfp4")
    x, w, _ = outlier_layer(2, tokens=256, d_in=128, d_out=96, frac=0.04)
    ws = [w[:, :48], w[:, 48:] * 3.0]
    res = permute.search(x, ws, weights=fmt, acts=fmt, rotate=rotate.candidates(16, 128))
    ident = np.arange(128)
    for k, (e_ref, e_new) in enumerate(zip(res.layer_err_identity, res.layer_err_permuted)):
        assert e_ref == pytest.approx(err(x, ws[k], ident, fmt), rel=1e-5)
        if res.accepted:
            assert e_new <= e_ref
            assert e_new == pytest.approx(err(x, ws[k], res.perm, fmt, res.rotate), rel=1e-5)


def test_bad_rotation_arguments_are_named():
    x, w, _ = outlier_layer(0, tokens=32, d_in=64, d_out=8)
    with pytest.raises(ValueError, match="wider than d_in=64"):
        permute.search(x, w, rotate=(None, "hadamard:128"))
    with pytest.raises(ValueError, match="twice"):
        permute.search(x, w, rotate=(None, None))
    with pytest.raises(ValueError, match="malformed input transform"):
        permute.search(x, w, rotate=(None, "hadamard"))
    with pytest.raises(ValueError, match="power of four"):
        permute.search(x, w, rotate=("regular_hadamard:32",))


def test_candidates_are_legal_blocks_from_the_group_up():
    assert rotate.candidates(16, 48) == (None, "hadamard:16", "regular_hadamard:16")
    assert rotate.candidates(32, 3072, max_block=256) == (
        None, "hadamard:32", "hadamard:64", "hadamard:128", "hadamard:256",
        "regular_hadamard:64", "regular_hadamard:256",
    )
    assert rotate.candidates(64, 32) == (None,)  # group wider than the input: no rotation
