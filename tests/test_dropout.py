"""Tests for diffusion_jax.models.dropout.

The Threefry block function is checked against the known-answer vectors that
ship with Random123 (Salmon et al. 2011; ``kat_vectors``, ``threefry2x32_20``);
the bits, the Bernoulli draws and the dropout against JAX's and Flax's own
(``jax.random.bits``, ``jax.random.bernoulli``, ``flax.linen.Dropout``), which
the module promises to equal bit for bit; the kept fraction against the
binomial distribution.
"""

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax.models import UNet, UNetConfig, unet
from diffusion_jax.models.dropout import (
    Dropout,
    bernoulli,
    dropout,
    random_bits,
    threefry_2x32,
)

# Random123's kat_vectors, threefry2x32_20: key words, counter words -> output words.
RANDOM123_KAT = [
    ((0x00000000, 0x00000000), (0x00000000, 0x00000000), (0x6B200159, 0x99BA4EFE)),
    ((0xFFFFFFFF, 0xFFFFFFFF), (0xFFFFFFFF, 0xFFFFFFFF), (0x1CB996FC, 0xBB002BE7)),
    ((0x13198A2E, 0x03707344), (0x243F6A88, 0x85A308D3), (0xC4923A9C, 0x483DF7A0)),
]


@pytest.mark.parametrize("key, counter, expected", RANDOM123_KAT)
def test_threefry_matches_random123_known_answers(key, counter, expected):
    u32 = lambda v: jnp.asarray(v, jnp.uint32)
    out = jax.jit(threefry_2x32)((u32(key[0]), u32(key[1])), (u32(counter[0]), u32(counter[1])))
    assert tuple(int(v) for v in out) == expected


@pytest.mark.parametrize("shape", [(7,), (3, 5), (2, 3, 4, 5), (1, 8, 8, 33)])
def test_bits_equal_jax_random_bits(shape):
    key = jax.random.fold_in(jax.random.key(11), 3)
    ours = jax.jit(random_bits, static_argnums=1)(jax.random.key_data(key), shape)
    np.testing.assert_array_equal(ours, jax.random.bits(key, shape, jnp.uint32))


@pytest.mark.parametrize("p", [0.0, 0.1, 0.5, 0.9, 1.0 - 2.0**-20, 1.0])
@pytest.mark.parametrize("typed", [True, False])
def test_bernoulli_equals_jax_bernoulli(p, typed):
    key = jax.random.key(4) if typed else jax.random.PRNGKey(4)
    shape = (4, 16, 16, 8)
    ours = jax.jit(bernoulli, static_argnums=(1, 2))(key, p, shape)
    assert ours.dtype == jnp.bool_ and ours.shape == shape
    np.testing.assert_array_equal(ours, jax.random.bernoulli(key, p, shape))


def test_other_key_implementations_fall_back_to_jax():
    key = jax.random.key(4, impl="rbg")
    np.testing.assert_array_equal(bernoulli(key, 0.7, (64, 9)), jax.random.bernoulli(key, 0.7, (64, 9)))


def test_kept_fraction_is_binomial():
    # 2^20 draws with keep probability 0.9: the count's standard deviation is
    # sqrt(n p (1 - p)) = 307; five of them bound a correct sampler's count.
    n, p = 2**20, 0.9
    kept = int(jnp.sum(bernoulli(jax.random.key(0), p, (n,))))
    assert abs(kept - n * p) < 5 * math.sqrt(n * p * (1 - p))


def test_mask_is_fused_not_a_loop():
    # The reason for the module: JAX lowers its own Threefry to XLA:CPU as a
    # rolled loop over the whole mask; ours is one elementwise expression.
    def compiled_text(f, *args):
        return jax.jit(f).lower(*args).compile().as_text()

    x = jnp.ones((2, 8, 8, 4))
    assert "while" not in compiled_text(lambda k, x: dropout(k, 0.1, x), jax.random.key(0), x)
    # The check sees a loop where there is one.
    assert "while" in compiled_text(lambda x: jax.lax.fori_loop(0, 5, lambda i, v: v * 1.5 + i, x), x)


def test_64_bit_mode_falls_back_to_jax():
    # With jax_enable_x64 JAX draws a float64 uniform for a Python-float p.
    enable_x64 = jax.enable_x64 if hasattr(jax, "enable_x64") else jax.experimental.enable_x64

    key = jax.random.key(3)
    with enable_x64(True):
        ours = bernoulli(key, 0.3, (32, 32))
        theirs = jax.random.bernoulli(key, 0.3, (32, 32))
    np.testing.assert_array_equal(ours, theirs)
    assert not np.array_equal(ours, bernoulli(key, 0.3, (32, 32)))  # float32 draws differ


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_module_equals_flax_dropout(dtype):
    class Net(nn.Module):  # two dropout layers: flax's names (Dropout_0, Dropout_1) pick their keys
        cls: type

        @nn.compact
        def __call__(self, x, train):
            x = self.cls(0.1)(x, deterministic=not train)
            return self.cls(0.3)(2 * x, deterministic=not train)

    x = jax.random.normal(jax.random.key(1), (4, 8, 8, 16)).astype(dtype)
    rngs = {"dropout": jax.random.key(5)}
    ours = Net(Dropout).apply({}, x, True, rngs=rngs)
    theirs = Net(nn.Dropout).apply({}, x, True, rngs=rngs)
    assert ours.dtype == dtype
    np.testing.assert_array_equal(ours, theirs)
    assert 0.3 < float(jnp.mean(ours == 0)) < 0.45  # 1 - 0.9 * 0.7 = 0.37 dropped
    np.testing.assert_array_equal(Net(Dropout).apply({}, x, False), x * 2)


def test_module_keys_after_a_rate_one_layer_are_flax_keys():
    # Flax draws no key for rate 1 (all zeros); the next layer's key, and so
    # its mask, must not shift.
    class Net(nn.Module):
        cls: type

        @nn.compact
        def __call__(self, x):
            return self.cls(1.0)(x, deterministic=False), self.cls(0.5)(x, deterministic=False)

    x = jnp.ones((64, 64))
    rngs = {"dropout": jax.random.key(8)}
    ours, theirs = Net(Dropout).apply({}, x, rngs=rngs), Net(nn.Dropout).apply({}, x, rngs=rngs)
    np.testing.assert_array_equal(ours[0], jnp.zeros_like(x))
    np.testing.assert_array_equal(ours[1], theirs[1])


def test_rates_zero_and_one_and_bad_rates():
    x = jnp.arange(1.0, 13.0).reshape(3, 4)
    key = jax.random.key(0)
    np.testing.assert_array_equal(dropout(key, 0.0, x), x)
    np.testing.assert_array_equal(dropout(key, 1.0, x), jnp.zeros_like(x))
    for rate in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="rate must be in"):
            dropout(key, rate, x)


def test_unet_output_unchanged_from_flax_dropout(monkeypatch):
    # The UNet's ResBlocks use our Dropout; with flax's in its place (same
    # automatic names, so the same keys) a training-mode forward pass is the same.
    config = UNetConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), dropout=0.2)
    x = jax.random.normal(jax.random.key(1), (2, 16, 16, 3))
    t = jnp.array([3, 700])
    params = UNet(config).init(jax.random.key(0), x, t, train=False)["params"]
    # A fresh UNet outputs zeros (zero-initialised last layers): give every parameter a value.
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(2), len(leaves))
    params = jax.tree.unflatten(treedef, [0.2 * jax.random.normal(k, p.shape) for k, p in zip(keys, leaves)])

    def run():
        return UNet(config).apply({"params": params}, x, t, train=True, rngs={"dropout": jax.random.key(9)})

    ours = run()
    monkeypatch.setattr(unet, "Dropout", nn.Dropout)
    theirs = run()
    assert not np.allclose(ours, UNet(dataclasses.replace(config, dropout=0.0)).apply(
        {"params": params}, x, t, train=True), atol=1e-4)
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-6)
