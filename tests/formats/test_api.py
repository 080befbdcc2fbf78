"""Public API: registry and errors, size accounting, NaN/Inf checks, jit and pytree behaviour."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pqjax import formats
from tests.formats.helpers import F32, SHAPE, assert_same_bits, heavy_tailed, jitted

X = heavy_tailed(SHAPE, seed=11)  # the shared test shape: compiled programs are reused


def test_names_and_get():
    ints = [f"int{b}" for b in range(2, 9)]
    quartz = ["quartz", "quartz3", "quartz3_trunc", "quartz_trunc"]  # two-stage residual formats
    assert formats.names() == sorted(
        ["nvfp4", "mxfp4", "fp8", *ints, *(f"{n}_asym" for n in ints), *quartz]
    )
    assert formats.get("int4").group == 64 and formats.get("int4").symmetric
    assert formats.get("int4_asym") == formats.get("int4", symmetric=False)
    assert formats.get("int4", group="channel") == formats.get("int4", group=None)
    assert formats.get("INT4") == formats.get("int4")
    fmt = formats.get("nvfp4")
    assert formats.get(fmt) is fmt
    assert formats.get(formats.get("int4"), group=32).group == 32
    assert formats.get("fp8", scaling="token").scaling == "token"


def test_formats_are_frozen_and_hashable():
    fmts = [formats.get(n) for n in formats.names()]
    assert len({hash(f) for f in fmts}) == len(fmts)
    with pytest.raises(dataclasses.FrozenInstanceError):
        fmts[0].group = 3  # type: ignore[misc]


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match="unknown format 'int9'") as e:
        formats.get("int9")
    for n in ("nvfp4", "mxfp4", "int4", "int3_asym", "fp8"):
        assert n in str(e.value)


@pytest.mark.parametrize(
    ("name", "group", "pattern"),
    [
        ("nvfp4", 32, "nvfp4 allows only group 16"),
        ("nvfp4", None, "nvfp4 allows only group 16"),
        ("mxfp4", 16, "mxfp4 allows only group 32"),
        ("int4", 48, r"16, 32, 64, 128, 'channel' or None"),
        ("int3_asym", 8, r"int3_asym: group must be one of 16, 32, 64, 128"),
    ],
)
def test_bad_group_lists_valid_groups(name, group, pattern):
    with pytest.raises(ValueError, match=pattern):
        formats.get(name, group=group)


def test_other_bad_options():
    with pytest.raises(ValueError, match="scaling must be one of"):
        formats.get("fp8", scaling="block")
    with pytest.raises(ValueError, match="no group size"):
        formats.get("fp8", group=32)
    with pytest.raises(TypeError, match="unexpected quantize arguments"):
        formats.get("int4").quantize(X, global_scale=1.0)
    with pytest.raises(ValueError, match="already registered"):
        formats.register("int4", lambda **kw: formats.get("int4"))


def test_register_a_new_format():
    @dataclasses.dataclass(frozen=True)
    class Int4G32(formats.IntFormat):
        pass

    name = "test_only_int4g32"
    formats.register(name, lambda **kw: Int4G32(bits=4, group=32), replace=True)
    try:
        assert name in formats.names()
        y = jax.jit(lambda x: formats.fake_quant(x, name))(X)
        assert_same_bits(y, jitted(formats.get("int4", group=32))(X)[2], "registered format")
    finally:
        formats.registry._FACTORIES.pop(name)


@pytest.mark.parametrize(
    ("name", "kw", "bits_per_elem"),
    [
        ("mxfp4", {}, 4.25),
        ("int4", {}, 4.25),
        ("int3", {}, 3.25),
        ("int8", {}, 8.25),
        ("int4_asym", {}, 4.375),
        ("int2", {"group": 128}, 2.125),
        ("fp8", {}, None),
    ],
)
def test_nbytes(name, kw, bits_per_elem):
    x = np.ones((64, 512), F32)
    qt = jax.eval_shape(formats.get(name, **kw).quantize, x)  # shapes and dtypes only
    assert qt.nbytes == sum(a.size * a.dtype.itemsize for a in jax.tree_util.tree_leaves(qt))
    if bits_per_elem is not None:
        assert qt.nbytes * 8 == bits_per_elem * x.size
    else:
        assert qt.nbytes == x.size + 4  # one byte per element plus the float32 scale


def test_nvfp4_nbytes_formula():
    for shape in [(64, 512), (3, 16), (7, 48)]:
        x = np.ones(shape, F32)
        qt = jax.eval_shape(formats.get("nvfp4").quantize, x)
        assert qt.nbytes == x.size * 4.5 / 8 + 4  # 4 bits + 8 bits per 16, plus the global scale


@pytest.mark.parametrize("name", ["nvfp4", "int3", "int4_asym", "fp8"])
def test_nbytes_of_real_arrays(name):
    qt, _, _ = jitted(formats.get(name))(X)
    assert qt.nbytes == sum(np.asarray(a).nbytes for a in qt.leaves()) > 0


@pytest.mark.parametrize("name", ["nvfp4", "mxfp4", "int4", "int3_asym", "fp8"])
def test_non_finite_input_raises_eagerly(name):
    x = X.copy()
    x[0, 0], x[1, 5], x[2, 7] = np.nan, np.inf, -np.inf
    with pytest.raises(ValueError, match=rf"^{name}: input has 3 non-finite value"):
        formats.get(name).quantize(x)
    with pytest.raises(ValueError, match=rf"^{name}: input has 3 non-finite"):
        formats.fake_quant(jnp.asarray(x), name)


def test_checked_variants_under_jit():
    fmt = formats.get("nvfp4")
    f = jax.jit(lambda x: formats.checked_quantize(x, fmt))
    err, qt = f(X)
    assert err.get() is None
    assert_same_bits(qt.codes, jitted(fmt)(X)[0].codes, "checked codes")
    bad = X.copy()
    bad[0, :2] = np.nan
    err, _ = f(bad)
    assert "nvfp4: input has 2 non-finite value(s)" in err.get()
    with pytest.raises(Exception, match="nvfp4: input has 2 non-finite"):
        err.throw()
    g = jax.jit(lambda x: formats.checked_fake_quant(x, "int4", group=32))
    err, y = g(bad)
    assert "int4: input has 2" in err.get()
    err, y = g(X)
    assert err.get() is None
    assert_same_bits(y, jitted(formats.get("int4", group=32))(X)[2], "checked fake_quant")


def test_explicit_scale_validation():
    with pytest.raises(ValueError, match="global_scale must be >= 0"):
        formats.get("nvfp4").quantize(X, global_scale=-1.0)
    with pytest.raises(ValueError, match="non-finite"):
        formats.get("nvfp4").quantize(X, global_scale=np.inf)
    with pytest.raises(ValueError, match="explicit scale must be positive"):
        formats.get("fp8").quantize(X, scale=0.0)


@pytest.mark.parametrize("fmt", [formats.get("nvfp4"), formats.get("int3_asym", group=32)], ids=str)
def test_jit_static_arg_and_closure_match_eager(fmt):
    eager_q = fmt.quantize(X)
    eager_dq = eager_q.dequantize()
    q_static = jax.jit(formats.quantize, static_argnums=1)(X, fmt)
    fq_static = jax.jit(formats.fake_quant, static_argnums=1)(X, fmt)
    dq_closure = jax.jit(lambda q: q.dequantize())(q_static)
    for a, b in zip(jax.tree_util.tree_leaves(q_static), jax.tree_util.tree_leaves(eager_q)):
        assert_same_bits(a, b, f"{fmt.name} leaf")
    assert_same_bits(dq_closure, eager_dq, f"{fmt.name} dequantize")
    assert_same_bits(fq_static, eager_dq, f"{fmt.name} fake_quant")


def test_qtensor_pytree_and_dtypes():
    fmt = formats.get("nvfp4")
    qt = jitted(fmt)(X)[0]
    leaves, treedef = jax.tree_util.tree_flatten(qt)
    assert len(leaves) == 3  # codes, block_scale, global_scale (no zero point)
    qt2 = jax.tree_util.tree_unflatten(treedef, leaves)
    assert qt2.shape == X.shape and qt2.fmt == fmt
    assert len(jax.tree_util.tree_leaves(jitted(formats.get("int4_asym"))(X)[0])) == 3
    # bfloat16 in: computed in float32, output in the input dtype, identical to quantize ->
    # dequantize(bf16)
    xb = jnp.asarray(X, jnp.bfloat16)
    y = jax.jit(lambda x: formats.fake_quant(x, fmt))(xb)
    assert y.dtype == jnp.bfloat16
    want = jax.jit(lambda x: fmt.quantize(x).dequantize(jnp.bfloat16))(xb)
    assert_same_bits(y, want, "bf16")
    with pytest.raises(TypeError, match="floating-point"):
        fmt.quantize(np.ones((2, 16), np.int32))


@pytest.mark.parametrize("name", ["nvfp4", "mxfp4", "int4", "int3_asym", "fp8", "quartz"])
def test_an_eager_call_is_one_compiled_program_with_the_traced_bits(name):
    """Outside jit, quantize, dequantize and fake_quant each compile one program per (format,
    shape), plus the eager NaN/Inf count, not one per element operation (dozens); their bits
    are those of the same calls traced under jit."""
    fmt = formats.get(name)
    # a shape no other test uses, already a jax array (jax compiles the copy of a numpy array)
    x = jnp.asarray(heavy_tailed((5, 224), seed=23))
    compiles: list[str] = []

    def count(event: str, _secs: float, **_kw) -> None:
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(event)

    jax.monitoring.register_event_duration_secs_listener(count)
    try:
        qt = fmt.quantize(x)
        after_quantize = len(compiles)
        dq = qt.dequantize()
        fq = fmt.fake_quant(x)
    finally:
        jax.monitoring.unregister_event_duration_listener(count)
    assert after_quantize <= 2, f"{name}: eager quantize compiled {after_quantize} programs"
    assert len(compiles) <= 4, f"{name}: eager calls compiled {len(compiles)} programs"
    want_qt, want_dq, want_fq = jitted(fmt)(x)
    for got, want, what in ((qt.codes, want_qt.codes, "codes"),
                            (qt.block_scale, want_qt.block_scale, "block scales"),
                            (dq, want_dq, "dequantized"), (fq, want_fq, "fake_quant")):
        assert_same_bits(got, want, f"{name} {what}")
