"""Block-Hadamard rotations: the fast transforms against explicit matrices, orthogonality,
exact folds into kernels, names, tails, and the rotation hook of permute.search."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

from pqjax import formats, permute, rotate
from tests.permute.synthetic import outlier_layer

POW2 = (1, 2, 4, 8, 16, 32, 64, 128)


def test_fwht_matches_scipy_hadamard():
    rng = np.random.default_rng(0)
    xs = [rng.standard_normal((3, 5, n)).astype(np.float32) for n in POW2]
    got = jax.jit(lambda vs: [rotate.fwht(v) for v in vs])(xs)  # one compilation for all n
    for n, x, g in zip(POW2, xs, got):
        want = x.astype(np.float64) @ scipy.linalg.hadamard(n) / np.sqrt(n)
        np.testing.assert_allclose(np.asarray(g), want, atol=1e-5 * np.abs(want).max(), err_msg=n)
    with pytest.raises(ValueError, match="power of two"):
        rotate.fwht(jnp.ones((2, 12)))


def test_fwht_is_n_log_n_butterflies():
    """log2(n) butterfly stages: the jaxpr holds that many add/sub pairs, no matmul."""
    jaxpr = str(jax.make_jaxpr(rotate.fwht)(jnp.ones((2, 64))))
    assert "dot_general" not in jaxpr
    assert jaxpr.count(" add ") == 6 and jaxpr.count(" sub ") == 6


def test_regular_hadamard_construction():
    for n in (4, 16, 64, 256):
        r = rotate.regular_hadamard_matrix(n)
        assert set(np.unique(r)) == {-1, 1}
        np.testing.assert_array_equal(r @ r.T, n * np.eye(n, dtype=np.int64))  # Hadamard
        np.testing.assert_array_equal(r, r.T)
        # regular: every row and column sums to sqrt(n)
        assert (r.sum(0) == np.sqrt(n)).all() and (r.sum(1) == np.sqrt(n)).all()
        got = rotate.transform_matrix(f"regular_hadamard:{n}", n)
        np.testing.assert_allclose(got, r / np.sqrt(n), atol=1e-7)
    # R_4 is Sylvester H_4 with its first column and last three rows negated, rows reordered
    h4 = scipy.linalg.hadamard(4)
    flipped = np.diag([1, -1, -1, -1]) @ h4 @ np.diag([-1, 1, 1, 1])
    r4 = rotate.regular_hadamard_matrix(4)
    assert sorted(map(tuple, flipped)) == sorted(map(tuple, r4))
    with pytest.raises(ValueError, match="power of four"):
        rotate.regular_wht(jnp.ones((1, 32)))


def test_regular_spreads_a_shared_offset_sylvester_concentrates_it():
    """Why ConvRot wants a regular matrix: a constant block stays constant under R, becomes a
    sqrt(b)-times larger spike at position 0 under Sylvester."""
    x = jnp.full((2, 64), 0.5)
    syl = np.asarray(rotate.apply_input_transform("hadamard:16", x))
    reg = np.asarray(rotate.apply_input_transform("regular_hadamard:16", x))
    np.testing.assert_allclose(reg, 0.5, rtol=1e-6)
    np.testing.assert_allclose(syl[:, ::16], 0.5 * 4, rtol=1e-6)
    assert np.abs(np.delete(syl, np.s_[::16], axis=1)).max() < 1e-6


@pytest.mark.parametrize(
    "name", ["hadamard:16", "hadamard:2", "regular_hadamard:16", "hadamard:8:seed3"]
)
def test_transforms_are_orthogonal_and_folds_exact(name):
    d = 40  # not a multiple of 16: the 8-channel tail stays unrotated
    t = rotate.transform_matrix(name, d)
    np.testing.assert_allclose(t @ t.T, np.eye(d), atol=1e-6)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((7, d)).astype(np.float32)
    w = rng.standard_normal((d, 5)).astype(np.float32)
    xt = rotate.apply_input_transform(name, jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(xt), x @ t, atol=1e-5)
    wt = rotate.fold_into_kernel(name, jnp.asarray(w))
    np.testing.assert_allclose(np.asarray(wt), t.T @ w, atol=1e-5)
    np.testing.assert_allclose(np.asarray(xt @ wt), x @ w, rtol=1e-5, atol=1e-5)


def test_tail_is_left_unrotated():
    d, b = 40, 16
    assert rotate.rotated_dims(d, b) == 32 and rotate.rotated_dims(8, 16) == 0
    t = rotate.transform_matrix("hadamard:16", d)
    np.testing.assert_array_equal(t[32:, 32:], np.eye(8))
    assert not t[:32, 32:].any() and not t[32:, :32].any()
    # a layer narrower than one block is left as it is
    np.testing.assert_array_equal(rotate.transform_matrix("hadamard:16", 8), np.eye(8))


def test_names_and_seeds():
    assert rotate.parse_transform("regular_hadamard:64:seed3") == rotate.TransformSpec(
        "regular_hadamard", 64, 3
    )
    assert rotate.transform_name("hadamard", 16, 7) == "hadamard:16:seed7"
    for bad, msg in [
        ("hadamard:12", "power of two"),
        ("regular_hadamard:32", "power of four"),
        ("givens:16", "unknown input transform kind"),
        ("hadamard", "malformed"),
        ("hadamard:16:seedx", "malformed"),
    ]:
        with pytest.raises(ValueError, match=msg):
            rotate.parse_transform(bad)
    a = rotate.transform_matrix("hadamard:16:seed1", 32)
    np.testing.assert_array_equal(a, rotate.transform_matrix("hadamard:16:seed1", 32))
    assert not np.array_equal(a, rotate.transform_matrix("hadamard:16", 32))


def test_block_choice():
    assert rotate.block_for(64, 3072, "hadamard") == 64
    assert rotate.block_for(16, 3072, "regular_hadamard") == 16
    assert rotate.block_for(32, 3072, "regular_hadamard") == 16
    assert rotate.block_for(128, 3072, "regular_hadamard") == 64
    assert rotate.block_for(None, 320, "hadamard") == 64  # group None: largest dividing d_in
    assert rotate.block_for(None, 160, "regular_hadamard") == 16  # 160 = 32 * 5
    assert rotate.block_for(64, 320, "hadamard", override=8) == 8
    with pytest.raises(ValueError, match="power of four"):
        rotate.block_for(64, 320, "regular_hadamard", override=32)


def test_dtype_and_jit():
    x = jnp.asarray(np.random.default_rng(2).standard_normal((4, 48)), jnp.bfloat16)
    y = rotate.apply_input_transform("hadamard:16", x)
    assert y.dtype == jnp.bfloat16 and y.shape == x.shape
    name = "regular_hadamard:16:seed2"
    f = jax.jit(lambda v: rotate.apply_input_transform(name, v))
    x32 = x.astype(jnp.float32)
    x64 = np.asarray(x32, np.float64)
    t = rotate.transform_matrix(name, x.shape[-1])  # exact: entries +-1/4 (and 0)
    # Jitted, XLA fuses the butterfly stages and may reorder or contract them, so jit and eager
    # are two evaluations of each output sum_i T_ij x_i (16 terms, |T_ij| = 1/4): two stages
    # of 4-term sums with at most 4 roundings each, stage-1 errors carried with weights that
    # compose to |T|; so each evaluation is within 8u sum_i |T_ij x_i| of the exact value.
    tol = 8 * (np.finfo(np.float32).eps / 2) * (np.abs(x64) @ np.abs(t))
    for out in (f(x32), rotate.apply_input_transform(name, x32)):
        err = np.abs(np.asarray(out, np.float64) - x64 @ t)
        assert np.all(err <= tol), (err - tol).max()


def test_search_rotation_hook():
    """rotate=None is the old search; rotate=name scores Q(x P T) Q(T^T P^T W) in both orders."""
    x, w, _ = outlier_layer(0, tokens=64, d_in=64, d_out=32)
    fmt = formats.get("int4", group=16)
    plain = permute.search(x, w, weights=fmt, acts=fmt)
    none = permute.search(x, w, weights=fmt, acts=fmt, rotate=None)
    assert plain.err_identity == none.err_identity and plain.err_permuted == none.err_permuted
    res = permute.search(x, w, weights=fmt, acts=fmt, rotate="hadamard:16")
    # identity order under rotation: computed by hand
    xt = rotate.apply_input_transform("hadamard:16", x)
    wt = rotate.fold_into_kernel("hadamard:16", w)
    yq = fmt.fake_quant(xt) @ fmt.fake_quant(wt.T).T
    y = x @ w
    want = float(jnp.sum((y - yq) ** 2) / jnp.sum(y**2))
    assert res.err_identity == pytest.approx(want, rel=1e-4)
    [e] = permute.layer_errors(x, [w], np.arange(64), fmt, fmt, "hadamard:16")
    assert e == pytest.approx(res.err_identity, rel=1e-6)
    assert res.err_permuted <= res.err_identity or not res.accepted


def test_selected_transform_is_the_named_one():
    """`apply_selected` with a traced row applies the transform of that name: within the
    rounding bound of test_dtype_and_jit against the exact float64 product x T (T from
    scipy's Sylvester matrix or the integer regular construction), and bit for bit equal to
    `apply_input_transform` for Sylvester blocks, whose outputs are the same IEEE operations
    in the same order (two-term sums per stage, then one scaling; signs are exact)."""
    d = 96  # 96 = 3 * 32: blocks of 64 leave a 32-channel tail, 128 is wider than d
    names = (None, "hadamard:16", "hadamard:64", "hadamard:128", "hadamard:32:seed5",
             "regular_hadamard:4", "regular_hadamard:16", "regular_hadamard:64:seed2")
    table, max_block = rotate.transform_table(names, d)
    assert max_block == 128
    x = np.random.default_rng(7).standard_normal((5, d)).astype(np.float32)
    f = jax.jit(lambda i, v: rotate.apply_selected({k: jnp.asarray(a)[i] for k, a in
                                                    table.items()}, v, max_block))
    u = np.finfo(np.float32).eps / 2
    for i, name in enumerate(names):
        got = np.asarray(f(i, x), np.float64)
        if name is None:
            np.testing.assert_array_equal(got, x)
            continue
        spec = rotate.parse_transform(name)
        b, m = spec.block, rotate.rotated_dims(d, spec.block)
        block = (scipy.linalg.hadamard(b) if spec.kind == "hadamard"
                 else rotate.regular_hadamard_matrix(b)) / np.sqrt(b)
        t = np.eye(d)
        t[:m, :m] = np.kron(np.eye(m // b), block)
        if spec.seed is not None:
            t = np.diag(np.asarray(rotate._signs(spec.seed, d), np.float64)) @ t
        x64 = x.astype(np.float64)
        tol = 8 * u * (np.abs(x64) @ np.abs(t))
        assert np.all(np.abs(got - x64 @ t) <= tol), name
        if spec.kind == "hadamard":
            np.testing.assert_array_equal(got, rotate.apply_input_transform(name, x), name)


def test_joint_search_scores_each_pair_as_a_single_rotation_search():
    """One compiled body scores every (rotation, order) pair; each pair's error equals the
    search run with that rotation alone (a program of its own). The quantized operands are the
    same values (Sylvester blocks bit for bit, see above); only reductions may be summed in
    another order: errors are sums of 64 x 32 squared terms of 64-term products, so the
    relative difference is bounded by about (2048 + 64) u = 1.3e-4."""
    x, w, _ = outlier_layer(3, tokens=64, d_in=64, d_out=32)
    fmt = formats.get("int4", group=16)
    rots = (None, "hadamard:16", "hadamard:64")
    joint = permute.search(x, w, weights=fmt, acts=fmt, rotate=rots,
                           criterion=("joint_second_moment", "weight"))
    assert {r for r, *_ in joint.table} == set(rots) and len(joint.table) == 3 * 3
    for r in rots:
        single = permute.search(x, w, weights=fmt, acts=fmt, rotate=r,
                                criterion=("joint_second_moment", "weight"))
        mine = [e for rr, _c, _a, e, _q in joint.table if rr == r]
        theirs = [e for _r, _c, _a, e, _q in single.table]
        np.testing.assert_allclose(mine, theirs, rtol=1.3e-4, err_msg=str(r))
