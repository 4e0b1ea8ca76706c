"""Tests for diffusion_jax.models.unet.

Numbers are checked against values known independently of this code: the DDPM
CIFAR-10 parameter count, parameter counts worked out layer by layer from the
architecture description, closed-form sinusoid values, and a NumPy reference of
multi-head self-attention.
"""

import dataclasses
import functools
import math
import re

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax.models import UNet, UNetConfig, timestep_embedding
from diffusion_jax.models.unet import AttnBlock, ResBlock, _DenseParts, attention

# A small config that still has two levels, attention at 8x8 and a skip stack.
SMALL = dict(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), dropout=0.1)
B, H, W, C = 2, 16, 16, 3


def _count(tree) -> int:
    return sum(int(np.prod(a.shape)) for a in jax.tree.leaves(tree))


def _param_shapes(config, shape=(1, H, W, C), with_labels=False):
    """Parameter shapes from init under eval_shape: nothing is computed."""
    x = jax.ShapeDtypeStruct(shape, jnp.float32)
    t = jax.ShapeDtypeStruct(shape[:1], jnp.int32)
    y = jax.ShapeDtypeStruct(shape[:1], jnp.int32) if with_labels else None
    return jax.eval_shape(lambda k, x, t, y: UNet(config).init(k, x, t, y, train=False),
                          jax.random.key(0), x, t, y)["params"]


@functools.lru_cache(maxsize=None)
def _random_params(config, with_labels=False):
    """Random parameters of the right shapes, drawn here rather than by ``init``.

    A fresh UNet outputs exactly zero (zero-initialised output layers), which would
    make most comparisons vacuous; drawing every parameter also avoids compiling
    ``init`` for every config. Kernels are N(0, 1/fan_in), biases and norm offsets
    small, norm scales near 1, embeddings N(0, 1).
    """
    shapes = _param_shapes(config, with_labels=with_labels)
    paths, treedef = jax.tree_util.tree_flatten_with_path(shapes)
    rng = np.random.default_rng(0)
    leaves = []
    for path, s in paths:
        kind = path[-1].key
        if kind == "kernel":
            leaf = rng.normal(size=s.shape) / math.sqrt(np.prod(s.shape[:-1]))
        elif kind == "scale":
            leaf = 1 + 0.1 * rng.normal(size=s.shape)
        elif kind == "embedding":
            leaf = rng.normal(size=s.shape)
        else:
            leaf = 0.1 * rng.normal(size=s.shape)
        leaves.append(jnp.asarray(leaf, jnp.float32))
    return jax.tree.unflatten(treedef, leaves)


def _inputs(key, with_labels=False, num_classes=10):
    kx, kt, ky = jax.random.split(key, 3)
    x = jax.random.normal(kx, (B, H, W, C))
    t = jax.random.randint(kt, (B,), 0, 1000)
    y = jax.random.randint(ky, (B,), 0, num_classes) if with_labels else None
    return x, t, y


@functools.lru_cache(maxsize=None)
def _apply_fn(config, train=False):
    """A jitted apply, cached so that tests sharing a config share one compilation."""
    model = UNet(config)
    return jax.jit(lambda p, x, t, y=None, rng=None: model.apply(
        {"params": p}, x, t, y, train=train, rngs=None if rng is None else {"dropout": rng}))


# ----------------------------------------------------------------------------- parameter counts


def test_ddpm_cifar10_parameter_count():
    # Ho et al. 2020 App. B: "Our CIFAR10 model has 35.7 million parameters". The exact
    # count, 35,746,307, is what the diffusers port of the original checkpoint
    # (google/ddpm-cifar10-32, UNet2DModel) reports.
    params = _param_shapes(UNetConfig(), shape=(1, 32, 32, 3))
    assert _count(params) == 35_746_307
    assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(params))


def _conv3(cin, cout):
    return 9 * cin * cout + cout


def _dense(cin, cout):
    return cin * cout + cout


def _norm(c):
    return 2 * c


def _res(cin, cout, temb=128, scale_shift=False):
    shortcut = _dense(cin, cout) if cin != cout else 0
    return (_norm(cin) + _conv3(cin, cout) + _dense(temb, (2 if scale_shift else 1) * cout)
            + _norm(cout) + _conv3(cout, cout) + shortcut)


def _attn(c):
    return _norm(c) + _dense(c, 3 * c) + _dense(c, c)


def _small_count(scale_shift=False, updown=False, num_classes=None, out_ch=3):
    """SMALL on 16x16x3, layer by layer from the architecture of Ho et al. 2020 App. B.

    Skip stack on the way down: conv_in (32), down_0 block (32), downsample (32),
    down_1 block (64). Up level 1 consumes 64 then 32; up level 0 consumes 32 then 32.
    """
    res = lambda cin, cout: _res(cin, cout, scale_shift=scale_shift)  # noqa: E731
    resample = res(32, 32) if updown else _conv3(32, 32)
    upsample = res(64, 64) if updown else _conv3(64, 64)
    return sum([
        _dense(32, 128), _dense(128, 128),                      # timestep embedding
        (num_classes + 1) * 128 if num_classes else 0,          # class embedding incl. null class
        _conv3(3, 32),                                          # conv_in
        res(32, 32), resample,                                  # level 0 (16x16), downsample
        res(32, 64), _attn(64),                                 # level 1 (8x8)
        res(64, 64), _attn(64), res(64, 64),                    # middle
        res(64 + 64, 64), _attn(64), res(64 + 32, 64), _attn(64), upsample,  # up level 1
        res(64 + 32, 32), res(32 + 32, 32),                     # up level 0
        _norm(32), _conv3(32, out_ch),                          # output
    ])


@pytest.mark.parametrize("options", [
    {}, {"scale_shift_norm": True}, {"resblock_updown": True}, {"num_classes": 10}, {"out_channels": 6},
    {"scale_shift_norm": True, "resblock_updown": True, "num_classes": 5, "num_head_channels": 16},
])
def test_small_parameter_count_matches_hand_count(options):
    config = UNetConfig(**SMALL, **options)
    expected = _small_count(scale_shift=options.get("scale_shift_norm", False),
                            updown=options.get("resblock_updown", False),
                            num_classes=options.get("num_classes"),
                            out_ch=options.get("out_channels", 3))
    assert _count(_param_shapes(config, with_labels="num_classes" in options)) == expected


# ----------------------------------------------------------------------------- timestep embedding


def test_timestep_embedding_hand_values():
    # dim=6: half=3, frequencies 10000**(-i/2) = 1, 1e-2, 1e-4.
    emb = jax.jit(lambda t: timestep_embedding(t, 6))(jnp.array([0, 2]))
    chex.assert_shape(emb, (2, 6))
    np.testing.assert_allclose(emb[0], [0, 0, 0, 1, 1, 1], atol=1e-7)
    np.testing.assert_allclose(
        emb[1],
        [0.9092974268, 0.0199986667, 1.99999998667e-4,      # sin(2), sin(0.02), sin(2e-4)
         -0.4161468365, 0.9998000067, 0.99999998],          # cos(2), cos(0.02), cos(2e-4)
        rtol=1e-5, atol=1e-7)
    # Odd width: dim=5 uses half=2 (frequencies 1, 1e-4) and a zero last column.
    emb5 = timestep_embedding(jnp.array([1]), 5)
    np.testing.assert_allclose(emb5[0], [0.8414709848, 1e-4, 0.5403023059, 1.0, 0.0], rtol=1e-5, atol=1e-7)


def test_timestep_embedding_rejects_bad_input():
    with pytest.raises(ValueError, match="dim"):
        timestep_embedding(jnp.array([1]), 2)
    with pytest.raises(ValueError, match=r"\[B\]"):
        timestep_embedding(jnp.array([[1]]), 8)


# ----------------------------------------------------------------------------- attention


def _group_norm_ref(x, scale, bias, groups=32, eps=1e-6):
    b, h, w, c = x.shape
    g = x.reshape(b, h * w, groups, c // groups)
    mean = g.mean(axis=(1, 3), keepdims=True)
    var = g.var(axis=(1, 3), keepdims=True)
    return ((g - mean) / np.sqrt(var + eps)).reshape(x.shape) * scale + bias


@pytest.mark.parametrize("heads", [1, 4])
def test_attention_matches_numpy_reference(heads):
    c = 64
    x = np.asarray(jax.random.normal(jax.random.key(0), (2, 4, 4, c)), np.float64)
    block = AttnBlock(num_heads=heads)
    params = block.init(jax.random.key(1), jnp.asarray(x, jnp.float32))["params"]
    params["proj_out"]["kernel"] = jax.random.normal(jax.random.key(2), (c, c)) / 8
    params["proj_out"]["bias"] = jax.random.normal(jax.random.key(3), (c,))
    out = jax.jit(lambda p, x: block.apply({"params": p}, x))(params, jnp.asarray(x, jnp.float32))

    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    h = _group_norm_ref(x, p["norm"]["scale"], p["norm"]["bias"]).reshape(2, 16, c)
    qkv = h @ p["qkv"]["kernel"] + p["qkv"]["bias"]
    d = c // heads
    heads_out = []
    for i in range(heads):  # head i sees channels [i*d, (i+1)*d) of q, k and v
        q, k, v = (qkv[..., j * c + i * d: j * c + (i + 1) * d] for j in range(3))
        logits = q @ k.transpose(0, 2, 1) / np.sqrt(d)
        w = np.exp(logits - logits.max(-1, keepdims=True))
        heads_out.append((w / w.sum(-1, keepdims=True)) @ v)
    attn = np.concatenate(heads_out, axis=-1)
    expected = x + (attn @ p["proj_out"]["kernel"] + p["proj_out"]["bias"]).reshape(x.shape)
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("heads", [1, 4])
def test_attention_equals_jax_dot_product_attention(heads, dtype):
    # `attention` against JAX's own XLA implementation: values and the
    # gradients with respect to q, k and v (queries and keys of different lengths).
    b, t, s, d = 2, 12, 20, 16
    kq, kk, kv, kg = jax.random.split(jax.random.key(7), 4)
    q = jax.random.normal(kq, (b, t, heads, d)).astype(dtype)
    k = jax.random.normal(kk, (b, s, heads, d)).astype(dtype)
    v = jax.random.normal(kv, (b, s, heads, d)).astype(dtype)
    cotangent = jax.random.normal(kg, (b, t, heads, d)).astype(dtype)
    theirs_fn = functools.partial(jax.nn.dot_product_attention, implementation="xla")

    def value_and_vjp(fn):
        out, vjp = jax.vjp(fn, q, k, v)
        return out, vjp(cotangent)

    ours = jax.jit(lambda: value_and_vjp(attention))()
    theirs = jax.jit(lambda: value_and_vjp(theirs_fn))()
    assert ours[0].dtype == theirs[0].dtype == dtype
    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    for a, b_ in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs)):
        assert np.abs(np.asarray(b_, np.float32)).max() > 1e-2
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b_, np.float32), rtol=tol, atol=tol)


def test_attention_rejects_mismatched_shapes():
    q = jnp.zeros((2, 8, 1, 16))
    with pytest.raises(ValueError, match="attention"):
        attention(q, jnp.zeros((2, 8, 1, 8)), jnp.zeros((2, 8, 1, 8)))
    with pytest.raises(ValueError, match="attention"):
        attention(q, jnp.zeros((2, 8, 1, 16)), jnp.zeros((2, 9, 1, 16)))
    with pytest.raises(ValueError, match="attention"):
        attention(q[:, :, 0], q[:, :, 0], q[:, :, 0])


def test_dense_parts_start_each_part_at_the_scale_of_a_layer_of_its_own():
    """DDPM's attention has separate q, k, v projections of [C, C]: variance scaling with fan_avg
    (C + C) / 2 = C, uniform on +-sqrt(3 / C), std sqrt(1 / C) (one [C, 3C] kernel: fan_avg 2C)."""
    c = 256
    kernel = np.asarray(_DenseParts((c, c, c)).init(jax.random.key(1), jnp.zeros((1, c)))["params"]["kernel"])
    assert kernel.shape == (c, 3 * c)
    for part in np.split(kernel, 3, axis=1):
        assert np.abs(part).max() <= math.sqrt(3 / c)
        np.testing.assert_allclose(part.std(), math.sqrt(1 / c), rtol=0.02)  # 65536 draws: ~0.3% spread
    assert not np.array_equal(kernel[:, :c], kernel[:, c:2 * c])  # independent draws
    # Parts of other widths: fan_avg (C + f) / 2 each.
    kernel = np.asarray(_DenseParts((64, 448)).init(jax.random.key(2), jnp.zeros((1, c)))["params"]["kernel"])
    np.testing.assert_allclose(kernel[:, :64].std(), math.sqrt(2 / (c + 64)), rtol=0.03)
    np.testing.assert_allclose(kernel[:, 64:].std(), math.sqrt(2 / (c + 448)), rtol=0.02)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_dense_parts_is_nn_dense_in_parts(dtype):
    # The parameters of nn.Dense(sum of the parts) (names, shapes, dtypes), and
    # its output, split by columns.
    x = jax.random.normal(jax.random.key(0), (10, 8))
    parts = _DenseParts((3, 5, 4), dtype)
    dense = nn.Dense(12, dtype=dtype)
    params = parts.init(jax.random.key(1), x)["params"]
    chex.assert_trees_all_equal_shapes_and_dtypes(params, dense.init(jax.random.key(1), x)["params"])
    params = dict(params, bias=jax.random.normal(jax.random.key(2), (12,)))
    ours = parts.apply({"params": params}, x)
    theirs = jnp.split(dense.apply({"params": params}, x), [3, 8], axis=-1)
    assert [a.shape for a in ours] == [(10, 3), (10, 5), (10, 4)]
    for a, b_ in zip(ours, theirs):
        assert a.dtype == b_.dtype == dtype
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b_, np.float32), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match=r"\[N, C\]"):
        parts.apply({"params": params}, x[None])


@pytest.mark.parametrize("head_channels", [None, 16])  # one head; two heads of 16 at 32 channels
def test_unet_with_our_attention_equals_jax_attention(head_channels):
    # The whole network, attention_impl None (ours) against "xla" (JAX's):
    # the loss and every parameter's gradient agree.
    base = UNetConfig(**dict(SMALL, dropout=0.0, num_head_channels=head_channels))
    params = _random_params(base)
    x, t, _ = _inputs(jax.random.key(8))

    def loss_and_grad(config):
        def loss(p):
            return jnp.mean(jnp.square(UNet(config).apply({"params": p}, x, t, train=True)))
        return jax.jit(jax.value_and_grad(loss))(params)

    ours = loss_and_grad(base)
    reference = loss_and_grad(dataclasses.replace(base, attention_impl="xla"))
    assert reference[0] > 1e-3
    np.testing.assert_allclose(ours[0], reference[0], rtol=1e-5)
    chex.assert_trees_all_close(ours[1], reference[1], rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------- forward pass


def _fresh_params_output_and_block_calls(config, key, x, t):
    """A fresh ``init``'s parameters, the network's output with them, and
    ``(name, input, output)`` of every ResBlock and AttnBlock call in that forward pass."""
    calls = []

    def record(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if isinstance(context.module, (ResBlock, AttnBlock)) and context.method_name == "__call__":
            calls.append((context.module.name, args[0], out))
        return out

    def run(key):  # one compilation for init and apply
        params = UNet(config).init(key, x, t, train=False)["params"]
        with nn.intercept_methods(record):
            out = UNet(config).apply({"params": params}, x, t, train=False)
        return params, out, [(a, b) for _, a, b in calls]

    params, out, arrays = jax.jit(run)(key)
    return params, out, [(name, np.asarray(a), np.asarray(b)) for (name, _, _), (a, b) in zip(calls, arrays)]


def test_fresh_network_blocks_are_identities_and_output_is_zero():
    # Ho et al. 2020 (diffusion_tf/models/unet.py) initialise three layers with
    # init_scale=0: each residual block's second conv ("conv2"), each attention
    # block's output projection ("proj_out") and the final conv ("conv_out"). So a
    # fresh network outputs exactly 0, and every block is the identity on its input
    # (attention), or on its shortcut path: the input resampled like the block
    # (average pooling / nearest-neighbour repeat) and projected by "nin_shortcut"
    # where the width changes. ADM's resampling blocks cover all three kinds of
    # residual block (plain, down, up).
    config = UNetConfig(**SMALL, resblock_updown=True)
    x, t, _ = _inputs(jax.random.key(0))
    params, out, calls = _fresh_params_output_and_block_calls(config, jax.random.key(1), x, t)
    zero_init = {"conv2", "proj_out", "conv_out"}
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        if path[-2].key in zero_init:
            assert not np.any(np.asarray(leaf)), f"{jax.tree_util.keystr(path)} is not zero-initialised"
    assert out.dtype == jnp.float32
    assert np.all(np.asarray(out) == 0.0)
    blocks = {n for n in params if "block" in n or "attn" in n or "sample" in n}
    assert sorted(name for name, _, _ in calls) == sorted(blocks)
    for name, block_in, block_out in calls:
        shortcut = np.asarray(block_in, np.float64)
        if name.endswith("_downsample"):
            b, h, w, c = shortcut.shape
            shortcut = shortcut.reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))
        elif name.endswith("_upsample"):
            shortcut = shortcut.repeat(2, axis=1).repeat(2, axis=2)
        if "nin_shortcut" in params[name]:
            nin = params[name]["nin_shortcut"]
            shortcut = shortcut @ np.asarray(nin["kernel"], np.float64) + np.asarray(nin["bias"], np.float64)
        assert block_out.shape == shortcut.shape, name
        assert np.abs(block_out).max() > 0.1, name
        np.testing.assert_allclose(block_out, shortcut, rtol=1e-5, atol=1e-5, err_msg=name)


@pytest.mark.parametrize("options", [
    {}, {"scale_shift_norm": True, "resblock_updown": True, "num_heads": 2}, {"out_channels": 2 * C},
])
def test_output_shape_dtype_finite_and_depends_on_x_and_t(options):
    config = UNetConfig(**SMALL, **options)
    params = _random_params(config)
    x, t, _ = _inputs(jax.random.key(1))
    apply = _apply_fn(config)
    out = apply(params, x, t)
    chex.assert_shape(out, (B, H, W, options.get("out_channels", C)))
    chex.assert_type(out, jnp.float32)
    chex.assert_tree_all_finite(out)
    assert np.abs(np.asarray(out)).mean() > 1e-3
    # Each input alone: the other one held fixed.
    assert not np.allclose(apply(params, x, (t + 1) % 1000), out, atol=1e-5), "output ignores t"
    assert not np.allclose(apply(params, -x, t), out, atol=1e-5), "output ignores x"
    # Examples are processed independently: reversing the batch reverses the output.
    np.testing.assert_allclose(apply(params, x[::-1], t[::-1]), out[::-1], rtol=1e-5, atol=1e-5)


def test_class_conditioning_with_null_label():
    config = UNetConfig(**SMALL, num_classes=10)
    params = _random_params(config, with_labels=True)
    assert params["class_embed"]["embedding"].shape == (11, 4 * config.ch)  # 10 classes + null
    x, t, y = _inputs(jax.random.key(1), with_labels=True)
    apply = _apply_fn(config)
    out = apply(params, x, t, y)
    out_null = apply(params, x, t, jnp.full((B,), 10))  # label num_classes = null class
    chex.assert_shape([out, out_null], (B, H, W, C))
    chex.assert_tree_all_finite([out, out_null])
    assert not np.allclose(out, out_null, atol=1e-5), "labels do not change the output"
    with pytest.raises(ValueError, match="num_classes"):
        UNet(config).apply({"params": params}, x, t, train=False)  # labels missing
    with pytest.raises(ValueError, match=r"\[0, 10\]"):
        UNet(config).apply({"params": params}, x, t, jnp.array([0, 11]), train=False)
    with pytest.raises(ValueError, match="num_classes is None"):
        UNet(UNetConfig(**SMALL)).apply({"params": params}, x, t, y, train=False)


def _matmul_operand_dtypes(lowered_text):
    """``(op, lhs dtype, rhs dtype)`` of every convolution and dot_general in StableHLO text."""
    pattern = r"stablehlo\.(convolution|dot_general).*: \(tensor<[0-9x]*x(\w+)>, tensor<[0-9x]*x(\w+)>\)"
    return [m.groups() for m in map(functools.partial(re.search, pattern), lowered_text.splitlines()) if m]


def test_bfloat16_compute_matches_float32():
    f32 = UNetConfig(**SMALL)
    bf16 = UNetConfig(**SMALL, dtype="bfloat16")
    params = _random_params(f32)
    # Parameters stay float32 in bfloat16 mode and have the same structure.
    bf16_params = _param_shapes(bf16)
    chex.assert_trees_all_equal_shapes_and_dtypes(bf16_params, params)
    x, t, _ = _inputs(jax.random.key(1))
    ref = _apply_fn(f32)(params, x, t)
    out = _apply_fn(bf16)(params, x, t)
    assert out.dtype == jnp.float32
    # bfloat16 keeps 8 significant bits (relative rounding 2**-9 ~ 0.2%); through ~20
    # layers the error grows to about 1% of the output's norm (measured 1.0%), far
    # below what a dtype mix-up (e.g. bf16 GroupNorm statistics gone wrong) gives,
    # and far above float32 rounding: an error under 0.1% means no bfloat16 compute.
    rel = np.linalg.norm(out - ref) / np.linalg.norm(ref)
    assert 1e-3 < rel < 0.03, rel

    # The compiled computation itself: with dtype="bfloat16" every convolution takes
    # bfloat16 operands, and so does at least one matmul per 2-D (Dense) kernel; the
    # float32 network has none.
    ops32 = _matmul_operand_dtypes(_apply_fn(f32).lower(params, x, t).as_text())
    ops16 = _matmul_operand_dtypes(_apply_fn(bf16).lower(params, x, t).as_text())
    num_convs = sum(op == "convolution" for op, _, _ in ops32)
    num_dense = sum(a.ndim == 2 for a in jax.tree.leaves(params))
    assert num_convs >= 8 and num_dense >= 8
    assert all((lhs, rhs) == ("f32", "f32") for _, lhs, rhs in ops32)
    bf16_ops = [op for op, lhs, rhs in ops16 if (lhs, rhs) == ("bf16", "bf16")]
    assert bf16_ops.count("convolution") == num_convs
    assert bf16_ops.count("dot_general") >= num_dense


def test_dropout_only_in_training():
    config = UNetConfig(**SMALL)  # dropout 0.1
    params = _random_params(config)
    x, t, _ = _inputs(jax.random.key(1))
    train, evaluate = _apply_fn(config, train=True), _apply_fn(config, train=False)
    k1, k2 = jax.random.key(2), jax.random.key(3)
    a, b = train(params, x, t, None, k1), train(params, x, t, None, k2)
    assert not np.allclose(a, b, atol=1e-5), "dropout masks do not depend on the rng"
    np.testing.assert_array_equal(train(params, x, t, None, k1), a)  # same key, same mask
    e1, e2 = evaluate(params, x, t, None, k1), evaluate(params, x, t, None, k2)
    np.testing.assert_array_equal(e1, e2)
    assert not np.allclose(a, e1, atol=1e-5), "train=True does not apply dropout"


def test_gradients_under_jit_are_finite_and_reach_every_parameter():
    # One level with attention: a small graph, so the backward pass compiles fast.
    config = UNetConfig(ch=32, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(16,), dropout=0.0)
    params = _random_params(config)
    x, t, _ = _inputs(jax.random.key(1))
    model = UNet(config)
    loss = lambda p: jnp.mean(model.apply({"params": p}, x, t, train=False) ** 2)  # noqa: E731
    grads = jax.jit(jax.grad(loss))(params)
    chex.assert_trees_all_equal_shapes_and_dtypes(grads, params)
    chex.assert_tree_all_finite(grads)
    for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]:
        assert np.abs(np.asarray(g)).max() > 0, f"zero gradient for {jax.tree_util.keystr(path)}"


# ----------------------------------------------------------------------------- errors


def test_bad_inputs_raise_clear_errors():
    config = UNetConfig(**SMALL | {"ch_mult": (1, 2, 2)})  # needs sides divisible by 4
    model = UNet(config)
    key = jax.random.key(0)
    with pytest.raises(ValueError, match=r"18x18.*divisible by 4"):
        model.init(key, jnp.zeros((1, 18, 18, 3)), jnp.zeros((1,), jnp.int32), train=False)
    with pytest.raises(ValueError, match="rank 4"):
        model.init(key, jnp.zeros((16, 16, 3)), jnp.zeros((1,), jnp.int32), train=False)
    with pytest.raises(ValueError, match=r"t must have shape \[B\]"):
        model.init(key, jnp.zeros((2, 16, 16, 3)), jnp.zeros((3,), jnp.int32), train=False)
    with pytest.raises(TypeError, match="floating"):
        model.init(key, jnp.zeros((1, 16, 16, 3), jnp.int32), jnp.zeros((1,), jnp.int32), train=False)
    with pytest.raises(ValueError, match="num_head_channels=24"):
        UNet(UNetConfig(**SMALL | {"num_head_channels": 24})).init(
            key, jnp.zeros((1, 16, 16, 3)), jnp.zeros((1,), jnp.int32), train=False)


@pytest.mark.parametrize("field, value", [
    ("ch", 48), ("ch", 0), ("ch_mult", ()), ("ch_mult", (1, 0)), ("num_res_blocks", 0),
    ("attn_resolutions", (16, -1)), ("dropout", 1.0), ("out_channels", 0), ("num_heads", 0),
    ("num_head_channels", 0), ("num_classes", 0), ("dtype", "float16"), ("attention_impl", "flash"),
])
def test_config_validation_names_the_field(field, value):
    with pytest.raises(ValueError, match=f"UNetConfig.{field}"):
        UNetConfig(**{field: value})


def test_config_accepts_lists_and_stays_hashable():
    config = UNetConfig(ch_mult=[1, 2], attn_resolutions=[8])
    assert config.ch_mult == (1, 2) and config.attn_resolutions == (8,)
    hash(config)


# ----------------------------------------------------------------------------- group norm
# The UNet's GroupNorm has a hand-written gradient (custom VJP), so both its value
# and its gradient are checked against independent computations.

from diffusion_jax.models.unet import GroupNorm, group_norm  # noqa: E402


def test_group_norm_matches_numpy_float64():
    x = np.asarray(jax.random.normal(jax.random.key(0), (2, 4, 4, 64)), np.float64) * 3 + 5
    scale = np.linspace(0.5, 1.5, 64)
    bias = np.linspace(-1, 1, 64)
    got = jax.jit(group_norm, static_argnums=(3, 4))(
        jnp.asarray(x, jnp.float32), jnp.asarray(scale, jnp.float32), jnp.asarray(bias, jnp.float32), 32, 1e-6)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, _group_norm_ref(x, scale, bias), rtol=1e-5, atol=2e-5)


def test_group_norm_statistics_survive_a_large_offset():
    # A one-pass E[x^2] - E[x]^2 variance in float32 loses the spread here
    # (mean 1e4, std 1; float32's spacing at 1e4 is 2^-10): the two-pass form
    # keeps it. The output's spread per group must be exact to float32
    # rounding of O(1) values; its values may be off by the rounding of the
    # mean itself, a few units of 2^-10.
    x = np.asarray(jax.random.normal(jax.random.key(1), (1, 8, 8, 32)), np.float64) + 1e4
    got = np.asarray(group_norm(jnp.asarray(x, jnp.float32), jnp.ones(32), jnp.zeros(32), 32, 1e-6), np.float64)
    want = _group_norm_ref(np.asarray(jnp.asarray(x, jnp.float32), np.float64), np.ones(32), np.zeros(32))
    np.testing.assert_allclose(got.reshape(64, 32).std(axis=0), want.reshape(64, 32).std(axis=0), rtol=1e-5)
    np.testing.assert_allclose(got, want, atol=8 * 2.0**-10)


def _group_norm_by_autodiff(x, scale, bias, groups=32, eps=1e-6):
    """The textbook formula in jnp, differentiated by JAX itself (no custom VJP)."""
    b, h, w, c = x.shape
    g = x.reshape(b, h * w, groups, c // groups)
    mean = g.mean(axis=(1, 3), keepdims=True)
    var = ((g - mean) ** 2).mean(axis=(1, 3), keepdims=True)
    return ((g - mean) / jnp.sqrt(var + eps)).reshape(x.shape) * scale + bias


def test_group_norm_gradient_survives_a_large_offset():
    # The gradient must use x - mu, never x and mu apart: at mean 1e4, std 1,
    # against the textbook formula dx = r (d - <d> - xh <d xh>) in float64 on
    # the forward's own float32 statistics (so only the backward's rounding
    # counts). Using x and mu apart costs ~1e-4 relative here; ours ~1e-7.
    from diffusion_jax.models.unet import _group_stats

    x = np.asarray(jax.random.normal(jax.random.key(8), (2, 4, 4, 64)), np.float64) + 1e4
    x32 = jnp.asarray(x, jnp.float32)
    dy = np.asarray(jax.random.normal(jax.random.key(9), x.shape), np.float64)
    scale, bias = np.linspace(0.5, 1.5, 64), np.linspace(-1, 1, 64)
    got = jax.vjp(lambda x, s, b: group_norm(x, s, b, 32, 1e-6), x32, jnp.asarray(scale, jnp.float32),
                  jnp.asarray(bias, jnp.float32))[1](jnp.asarray(dy, jnp.float32))
    mean, inv_std = (np.asarray(v, np.float64)[:, None, :, None] for v in _group_stats(x32, 32, 1e-6))
    xh = (np.asarray(x32, np.float64).reshape(2, 16, 32, 2) - mean) * inv_std
    d = (dy * scale).reshape(2, 16, 32, 2)
    group_mean = lambda v: v.mean(axis=(1, 3), keepdims=True)  # noqa: E731
    want = ((inv_std * (d - group_mean(d) - xh * group_mean(d * xh))).reshape(x.shape),
            (dy * xh.reshape(x.shape)).sum(axis=(0, 1, 2)), dy.sum(axis=(0, 1, 2)))
    for name, g, w in zip(("x", "scale", "bias"), got, want):
        np.testing.assert_allclose(np.asarray(g, np.float64), w, rtol=1e-5, atol=1e-5 * np.max(np.abs(w)),
                                   err_msg=name)


@pytest.fixture(params=["cpu", "other"])
def per_channel_backend(request, monkeypatch):
    """Runs a test with both of ``_per_channel``'s branches (CPU: a 0/1 matmul; elsewhere: jnp.repeat)."""
    from diffusion_jax.models import unet

    if request.param == "other":
        monkeypatch.setattr(unet.jax, "default_backend", lambda: "gpu")
    return request.param


@pytest.mark.parametrize("groups", [1, 8, 32, 64])
def test_group_norm_value_and_gradient_for_any_group_size(per_channel_backend, groups):
    x = jax.random.normal(jax.random.key(10), (2, 4, 4, 64)) * 2 + 1
    scale = 1 + 0.3 * jax.random.normal(jax.random.key(11), (64,))
    bias = 0.3 * jax.random.normal(jax.random.key(12), (64,))
    weights = jax.random.normal(jax.random.key(13), x.shape)
    np.testing.assert_allclose(group_norm(x, scale, bias, groups, 1e-6),
                               _group_norm_by_autodiff(x, scale, bias, groups), rtol=1e-5, atol=1e-5)

    def loss(fn):
        return lambda x, s, b: jnp.sum(jnp.sin(fn(x, s, b)) * weights)

    got = jax.grad(loss(lambda x, s, b: group_norm(x, s, b, groups, 1e-6)), argnums=(0, 1, 2))(x, scale, bias)
    want = jax.grad(loss(lambda x, s, b: _group_norm_by_autodiff(x, s, b, groups)), argnums=(0, 1, 2))(
        x, scale, bias)
    for name, g, w in zip(("x", "scale", "bias"), got, want):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5 * float(jnp.max(jnp.abs(w))), err_msg=name)


def test_group_norm_gradient_matches_autodiff_of_the_formula():
    x = jax.random.normal(jax.random.key(2), (3, 4, 4, 64)) * 2 + 1
    scale = 1 + 0.3 * jax.random.normal(jax.random.key(3), (64,))
    bias = 0.3 * jax.random.normal(jax.random.key(4), (64,))
    # A loss that is not invariant to the normalisation (unlike sum(y)).
    weights = jax.random.normal(jax.random.key(5), x.shape)

    def loss(fn):
        return lambda x, s, b: jnp.sum(jnp.sin(fn(x, s, b)) * weights)

    got = jax.jit(jax.grad(loss(lambda x, s, b: group_norm(x, s, b, 32, 1e-6)), argnums=(0, 1, 2)))(x, scale, bias)
    want = jax.jit(jax.grad(loss(_group_norm_by_autodiff), argnums=(0, 1, 2)))(x, scale, bias)
    for name, g, w in zip(("x", "scale", "bias"), got, want):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5 * float(jnp.max(jnp.abs(w))), err_msg=name)


def test_group_norm_gradient_keeps_the_input_dtype():
    x = jax.random.normal(jax.random.key(6), (2, 4, 4, 32)).astype(jnp.bfloat16)
    dx, ds = jax.grad(lambda x, s: jnp.sum(group_norm(x, s, jnp.zeros(32), 32, 1e-6) ** 3), argnums=(0, 1))(
        x, jnp.ones(32))
    assert dx.dtype == jnp.bfloat16 and ds.dtype == jnp.float32


def test_group_norm_module_is_flax_group_norm():
    # Same parameter names, shapes and initial values, and the same output.
    import flax.linen as nn

    x = jax.random.normal(jax.random.key(7), (2, 4, 4, 64)) * 2 - 1
    ours, theirs = GroupNorm(num_groups=32, epsilon=1e-6), nn.GroupNorm(num_groups=32, epsilon=1e-6)
    p_ours = ours.init(jax.random.key(0), x)["params"]
    p_theirs = theirs.init(jax.random.key(0), x)["params"]
    chex.assert_trees_all_equal(p_ours, p_theirs)
    p = {"scale": jnp.linspace(0.5, 2, 64), "bias": jnp.linspace(-1, 1, 64)}
    np.testing.assert_allclose(ours.apply({"params": p}, x), theirs.apply({"params": p}, x), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="32 groups do not divide 48 channels"):
        ours.init(jax.random.key(0), jnp.zeros((1, 2, 2, 48)))


# ----------------------------------------------------------------------------- speed choice
# Where "auto" computes a 3x3 convolution's weight gradient by kernel taps on CPU.

from diffusion_jax.models.unet import _taps_pay_off  # noqa: E402


@pytest.mark.parametrize("lhs,rhs,strides,want", [
    ((32, 16, 16, 128), (3, 3, 128, 128), (1, 1), True),    # 32*16*16 = 8192 positions
    ((16, 16, 16, 256), (3, 3, 256, 256), (1, 1), True),    # 16*16*16 = 4096
    ((32, 32, 32, 128), (3, 3, 128, 256), (1, 1), True),
    ((32, 32, 32, 128), (3, 3, 128, 128), (2, 2), True),    # stride 2: 32*16*16 = 8192
    ((15, 16, 16, 256), (3, 3, 256, 256), (1, 1), False),   # 3840 positions
    ((64, 8, 8, 256), (3, 3, 256, 256), (1, 1), False),     # 4096 positions, but an 8x8 map
    ((32, 16, 16, 128), (3, 3, 128, 128), (2, 2), False),   # 32*8*8 = 2048, 8x8
    ((32, 32, 32, 3), (3, 3, 3, 128), (1, 1), False),       # the 3-channel input conv
    ((32, 32, 32, 128), (3, 3, 128, 64), (1, 1), False),    # 64 output channels
    ((16, 17, 17, 128), (3, 3, 128, 128), (2, 2), False),   # 16*9*9 = 1296 (SAME rounds up)
])
def test_tap_weight_gradient_is_chosen_by_positions_map_and_channels(lhs, rhs, strides, want):
    assert _taps_pay_off(lhs, rhs, strides) is want


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the taps are a CPU choice")
def test_auto_leaves_the_weight_gradient_to_xla_with_eigen_convolutions(monkeypatch):
    # With Eigen convolutions (diffusion_jax.xla_cpu) XLA's own kernel gradient
    # is faster than the taps: "auto" uses it everywhere; "taps" still forces them.
    from diffusion_jax.models.unet import (_conv_function, _conv_general_dilated_taps,
                                           _conv_general_dilated_taps_where_faster)

    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
    assert _conv_function("auto") is _conv_general_dilated_taps_where_faster
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type=individual_dot,reduce")
    assert _conv_function("auto") is None  # nn.Conv's default: lax.conv_general_dilated
    assert _conv_function("taps") is _conv_general_dilated_taps
    assert _conv_function("xla") is None


# ----------------------------------------------------------------------------- upsample + conv
# Nearest 2x upsampling followed by a 3x3 conv, computed on the low-resolution map.


from diffusion_jax.models.unet import (  # noqa: E402
    Upsample, UpsampleConv, _default_init, _zero_init, upsample_conv3x3, upsample_conv3x3_kernel)


def _upsample_conv_ref(x, w):
    """NumPy float64: repeat every pixel 2x2, zero-pad by 1, sum the 9 shifted products."""
    u = np.repeat(np.repeat(x, 2, axis=1), 2, axis=2)
    b, h, wd, _ = u.shape
    up = np.pad(u, ((0, 0), (1, 1), (1, 1), (0, 0)))
    out = np.zeros((b, h, wd, w.shape[-1]))
    for i in range(3):
        for j in range(3):
            out += up[:, i:i + h, j:j + wd, :] @ w[i, j]
    return out


@pytest.mark.parametrize("shape,c_out", [((2, 3, 5, 4), 6), ((1, 1, 1, 2), 3), ((3, 4, 4, 8), 8)])
def test_upsample_conv3x3_matches_upsampling_then_convolving(shape, c_out):
    rng = np.random.default_rng(0)
    x = rng.normal(size=shape)
    w = rng.normal(size=(3, 3, shape[-1], c_out))
    got = jax.jit(upsample_conv3x3)(jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32))
    b, h, wd, _ = shape
    chex.assert_shape(got, (b, 2 * h, 2 * wd, c_out))
    np.testing.assert_allclose(got, _upsample_conv_ref(x, w), rtol=1e-5, atol=1e-5)


def test_upsample_conv3x3_kernel_by_hand():
    # 1 input and 1 output channel, kernel rows/columns 1..9: phase (0, 0) reads
    # input taps (i-1, i) x (j-1, j) with weights [w0, w1 + w2] along each axis.
    w = jnp.arange(1.0, 10.0).reshape(3, 3, 1, 1)  # w[i, j] = 3 i + j + 1
    k = np.asarray(upsample_conv3x3_kernel(w))[:, :, 0, :]  # [r, s, (a, b)]
    m = np.arange(1.0, 10.0).reshape(3, 3)
    fold = [np.array([[1, 0, 0], [0, 1, 1]]), np.array([[1, 1, 0], [0, 0, 1]])]  # phase a: taps x rows
    for a in (0, 1):
        for b in (0, 1):
            np.testing.assert_array_equal(k[:, :, 2 * a + b], fold[a] @ m @ fold[b].T)
    np.testing.assert_array_equal(k[:, :, 0], [[1, 2 + 3], [4 + 7, 5 + 6 + 8 + 9]])


@pytest.mark.parametrize("grad_by_matmuls", [True, False])
def test_upsample_conv3x3_gradient_matches_autodiff_of_the_formula(grad_by_matmuls):
    kx, kw, kg = jax.random.split(jax.random.key(3), 3)
    x = jax.random.normal(kx, (2, 4, 6, 8))
    w = jax.random.normal(kw, (3, 3, 8, 5)) / 8
    g = jax.random.normal(kg, (2, 8, 12, 5))

    def formula(x, w):
        u = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return jax.lax.conv_general_dilated(u, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))

    want = jax.vjp(formula, x, w)[1](g)
    fn = functools.partial(upsample_conv3x3, grad_by_matmuls=grad_by_matmuls)
    got = jax.jit(lambda x, w, g: jax.vjp(fn, x, w)[1](g))(x, w, g)
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_upsample_conv3x3_in_bfloat16_and_bad_shapes():
    x = jax.random.normal(jax.random.key(0), (2, 4, 4, 8))
    w = jax.random.normal(jax.random.key(1), (3, 3, 8, 8)) / 8
    out = upsample_conv3x3(x.astype(jnp.bfloat16), w.astype(jnp.bfloat16))
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(out.astype(jnp.float32), upsample_conv3x3(x, w), rtol=0.05, atol=0.05)
    g = jax.random.normal(jax.random.key(2), (2, 8, 8, 8))

    def grads(x, w):
        return jax.grad(lambda x, w: jnp.sum(upsample_conv3x3(x, w).astype(jnp.float32) * g), argnums=(0, 1))(x, w)

    dx, dw = grads(x.astype(jnp.bfloat16), w.astype(jnp.bfloat16))
    assert dx.dtype == dw.dtype == jnp.bfloat16
    for low, full in zip((dx, dw), grads(x, w)):
        scale = float(jnp.max(jnp.abs(full)))
        np.testing.assert_allclose(low.astype(jnp.float32), full, atol=0.03 * scale)
    # A float32 kernel with bfloat16 inputs: the taps are summed in float32, then cast.
    assert upsample_conv3x3(x.astype(jnp.bfloat16), w).dtype == jnp.bfloat16
    with pytest.raises(ValueError, match=r"kernel \[3, 3, C, C_out\]"):
        upsample_conv3x3(x, jnp.zeros((3, 3, 4, 8)))
    with pytest.raises(ValueError, match=r"kernel \[3, 3, C, C_out\]"):
        upsample_conv3x3(x, jnp.zeros((1, 1, 8, 8)))
    with pytest.raises(ValueError, match=r"kernel \[3, 3, C, C_out\]"):
        upsample_conv3x3(x, jnp.zeros((3, 3, 8)))


class _RepeatThenConv(nn.Module):
    """The upsampling layer as first written: repeat each pixel 2x2, then ``nn.Conv``."""

    @nn.compact
    def __call__(self, x):
        u = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return nn.Conv(x.shape[-1], (3, 3), padding="SAME", kernel_init=_default_init, name="conv")(u)


def test_upsample_module_is_repeat_then_flax_conv():
    # Same parameter names, shapes and initial values as the nn.Conv it replaces,
    # and the same output.
    x = jax.random.normal(jax.random.key(5), (2, 4, 4, 16))
    p_theirs = _RepeatThenConv().init(jax.random.key(0), x)["params"]
    p_ours = Upsample().init(jax.random.key(0), x)["params"]
    chex.assert_trees_all_equal(p_ours, p_theirs)
    p = {"conv": {"kernel": p_theirs["conv"]["kernel"], "bias": jnp.linspace(-1, 1, 16)}}
    np.testing.assert_allclose(Upsample().apply({"params": p}, x), _RepeatThenConv().apply({"params": p}, x),
                               rtol=1e-5, atol=1e-5)
    zero = UpsampleConv(4, zero_init=True).init(jax.random.key(0), x)["params"]
    assert not np.any(zero["kernel"]) and zero["kernel"].shape == (3, 3, 16, 4)


class _RepeatThenConvAs(nn.Module):
    """Stand-in for ``UpsampleConv`` (same fields and parameters) that upsamples first."""

    features: int
    dtype: jnp.dtype = jnp.float32
    zero_init: bool = False

    @nn.compact
    def __call__(self, x):
        u = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        conv = nn.Conv(self.features, (3, 3), padding="SAME", dtype=self.dtype, name="conv")
        # Parameters at this module's own level, as UpsampleConv has them.
        return conv.apply({"params": {"kernel": self.param("kernel", _default_init, (3, 3, x.shape[-1], self.features)),
                                      "bias": self.param("bias", nn.initializers.zeros_init(), (self.features,))}}, u)


@pytest.mark.parametrize("updown", [False, True])
def test_unet_output_is_unchanged_by_computing_upsampling_on_the_small_map(updown, monkeypatch):
    # The whole network, Upsample layers (updown=False) or ADM's upsampling
    # residual blocks (updown=True), against the same network with the
    # upsampled map written out.
    from diffusion_jax.models import unet as unet_module

    config = UNetConfig(**SMALL, resblock_updown=updown, scale_shift_norm=updown)
    params = _random_params(config)
    x, t, _ = _inputs(jax.random.key(4))
    ours = UNet(config).apply({"params": params}, x, t, train=False)
    monkeypatch.setattr(unet_module, "UpsampleConv", _RepeatThenConvAs)
    reference = UNet(config).apply({"params": params}, x, t, train=False)
    np.testing.assert_allclose(ours, reference, rtol=1e-4, atol=1e-4)
    assert np.abs(np.asarray(ours)).mean() > 1e-2


def _dense_on_the_4d_input(features, dtype, name, *, zero_init=False):
    """The projections as first written: ``nn.Dense`` on the NHWC input itself."""
    return nn.Dense(features, dtype=dtype, kernel_init=_zero_init if zero_init else _default_init, name=name)


def test_unet_value_and_gradient_unchanged_by_flattening_the_projections(monkeypatch):
    # The 1x1 shortcuts and the attention projections apply nn.Dense to the
    # pixels as a [B*H*W, C] matrix; against nn.Dense on the 4-D input (the
    # same parameters), the loss and every parameter's gradient agree.
    from diffusion_jax.models import unet as unet_module

    config = UNetConfig(**dict(SMALL, dropout=0.0))
    params = _random_params(config)
    x, t, _ = _inputs(jax.random.key(6))

    def loss_and_grad():
        def loss(p):
            return jnp.mean(jnp.square(UNet(config).apply({"params": p}, x, t, train=True)))
        return jax.value_and_grad(loss)(params)

    ours = loss_and_grad()
    monkeypatch.setattr(unet_module, "_dense", _dense_on_the_4d_input)
    reference = loss_and_grad()
    assert reference[0] > 1e-3
    np.testing.assert_allclose(ours[0], reference[0], rtol=1e-5)
    for path, g in jax.tree_util.tree_leaves_with_path(reference[1]):
        assert np.abs(np.asarray(g)).max() > 0, path
    chex.assert_trees_all_close(ours[1], reference[1], rtol=1e-4, atol=1e-6)


def test_a_traced_label_out_of_range_gives_nan_not_another_class():
    """Under jit the labels cannot be checked: -1 used to wrap to the null class silently."""
    config = UNetConfig(ch=32, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(), dropout=0.0, num_classes=3)
    model = UNet(config)
    x = jax.random.normal(jax.random.key(0), (5, 8, 8, 3))
    t = jnp.arange(5, dtype=jnp.int32)
    params = _random_params(config, with_labels=True)
    apply = jax.jit(lambda y: model.apply({"params": params}, x, t, y, train=False))
    out = np.asarray(apply(jnp.array([0, 3, -1, 4, 2], jnp.int32)))
    valid = np.asarray(apply(jnp.array([0, 3, 3, 3, 2], jnp.int32)))
    for i in (0, 1, 4):
        np.testing.assert_allclose(out[i], valid[i], rtol=1e-5, atol=1e-6)
    assert np.isnan(out[2]).all() and np.isnan(out[3]).all()
