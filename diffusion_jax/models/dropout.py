"""Dropout whose random mask XLA fuses into the pass that applies it.

``flax.linen.Dropout`` draws its mask with ``jax.random.bernoulli``. With the
default Threefry-2x32 keys, JAX lowers the hash to XLA:CPU as a loop of five
iterations over the whole mask (``threefry2x32``'s CPU lowering keeps the
loop rolled, to compile fast), so each dropout layer writes and re-reads the
two 32-bit counter arrays five times before its mask exists: 2% of the 35.7M
DDPM UNet's training step on the project's 2-core CPU, which this module
gains back (BENCHMARKS.md, change 11).

:func:`dropout` computes the same bits (Salmon et al. 2011, "Parallel random
numbers: as easy as 1, 2, 3": Threefry-2x32 with 20 rounds, as JAX's
``threefry2x32``; the 64-bit counter of element ``i`` of the row-major mask
split into words ``(0, i)``, the two output words XOR-ed, as JAX's
partitionable ``random_bits``), written out round by round in ``jnp``
integer ops, and the same ``uniform < keep`` comparison as
``jax.random.bernoulli``. The mask is an elementwise function of the element
index and the key, which XLA fuses into the select that applies it. For a
given key the result is bit-for-bit ``flax.linen.Dropout``'s (tested); keys of
another implementation, ``jax_threefry_partitionable=False``, 64-bit mode
(``jax_enable_x64``, where JAX draws a float64 uniform) and masks of ``2**32``
elements or more take ``jax.random.bernoulli`` itself.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

# Threefry-2x32 rotation constants, alternating every four rounds (Salmon et al. 2011).
_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))
_KEY_PARITY = np.uint32(0x1BD11BDA)  # the 32-bit key schedule's parity constant (Random123's SKEIN_KS_PARITY32)
_MANTISSA_BITS = 23  # float32


def threefry_2x32(key: tuple[jax.Array, jax.Array], x: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
    """The Threefry-2x32 block function, 20 rounds, unrolled: uint32 ``key`` and counter words ``x``.

    Five groups of four rounds (``x0 += x1; x1 = rotl(x1, r) ^ x0``), each followed
    by a key injection ``x0 += k[s+1], x1 += k[s+2] + s + 1`` (``s`` the group,
    ``k = (k0, k1, k0 ^ k1 ^ 0x1BD11BDA)`` indexed mod 3), after the initial
    ``x0 += k0, x1 += k1``. Broadcasts like any elementwise op.
    """
    k0, k1 = key
    ks = (k0, k1, k0 ^ k1 ^ _KEY_PARITY)
    x0, x1 = x[0] + ks[0], x[1] + ks[1]
    for group in range(5):
        for r in _ROTATIONS[group % 2]:
            x0 = x0 + x1
            x1 = (lax.shift_left(x1, np.uint32(r)) | lax.shift_right_logical(x1, np.uint32(32 - r))) ^ x0
        x0 = x0 + ks[(group + 1) % 3]
        x1 = x1 + ks[(group + 2) % 3] + np.uint32(group + 1)
    return x0, x1


def random_bits(key_data: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """uint32 bits equal to ``jax.random.bits(key, shape)`` for a Threefry key with data ``key_data``.

    Requires ``jax_threefry_partitionable`` (JAX's default) and fewer than
    ``2**32`` elements: element ``i`` (row-major) is ``y0 ^ y1`` with
    ``(y0, y1) = threefry_2x32(key_data, (0, i))``.
    """
    index = jnp.zeros(shape, jnp.uint32)
    stride = 1
    for axis in reversed(range(len(shape))):
        index = index + lax.broadcasted_iota(jnp.uint32, shape, axis) * np.uint32(stride)
        stride *= shape[axis]
    y0, y1 = threefry_2x32((key_data[0], key_data[1]), (jnp.zeros(shape, jnp.uint32), index))
    return y0 ^ y1


def _threefry_key_data(key: jax.Array) -> jax.Array | None:
    """The uint32[2] data of a Threefry-2x32 key (typed or raw), or None for any other key."""
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        if key.shape == () and str(jax.random.key_impl(key)) == "threefry2x32":
            return jax.random.key_data(key)
        return None
    if key.dtype == jnp.uint32 and key.shape == (2,) and jax.config.jax_default_prng_impl == "threefry2x32":
        return key
    return None


def bernoulli(key: jax.Array, p: float, shape: tuple[int, ...]) -> jax.Array:
    """``jax.random.bernoulli(key, p, shape)``, bit for bit, its bits an elementwise expression XLA can fuse.

    ``u = bitcast_f32((bits >> 9) | bits(1.0)) - 1`` (uniform on ``[0, 1)`` in
    steps of ``2**-23``) and the result is ``u < float32(p)``, as JAX computes it.
    """
    key_data = _threefry_key_data(key)
    if (key_data is None or not jax.config.jax_threefry_partitionable or math.prod(shape) >= 2**32
            or jnp.asarray(p).dtype != jnp.float32):  # 64-bit mode: JAX draws float64 uniforms
        return jax.random.bernoulli(key, p, shape)
    bits = random_bits(key_data, tuple(shape))
    one = np.array(1.0, np.float32).view(np.uint32)
    mantissa = lax.shift_right_logical(bits, np.uint32(32 - _MANTISSA_BITS)) | one
    uniform = lax.bitcast_convert_type(mantissa, jnp.float32) - np.float32(1.0)
    return uniform < np.float32(p)


def dropout(key: jax.Array, rate: float, x: jax.Array) -> jax.Array:
    """Inverted dropout (Srivastava et al. 2014): each entry kept with probability ``1 - rate``, scaled by ``1 / (1 - rate)``.

    ``rate`` in ``[0, 1]``: 0 returns ``x``, 1 returns zeros. Otherwise the
    result equals ``flax.linen.Dropout(rate)`` given the same key.
    """
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"dropout: rate must be in [0, 1], got {rate}")
    if rate == 0.0:
        return x
    if rate == 1.0:
        return jnp.zeros_like(x)
    keep = 1.0 - rate
    return lax.select(bernoulli(key, keep, x.shape), x / keep, jnp.zeros_like(x))


class Dropout(nn.Module):
    """:func:`dropout` as a Flax module, in place of ``flax.linen.Dropout(rate)``.

    Draws its key with ``make_rng(rng_collection)`` (none at rates 0 and 1,
    as flax). Named ``Dropout`` so that flax's automatic name (``Dropout_0``,
    ...), and with it the key, is that of ``flax.linen.Dropout`` in the same
    place: swapping one for the other leaves a model's masks unchanged. Only
    what the UNet uses: ``deterministic`` is a call argument (no attribute,
    no ``rng=``, no ``broadcast_dims``), and a rate outside ``[0, 1]`` raises
    instead of giving zeros.
    """

    rate: float
    rng_collection: str = "dropout"

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
        if deterministic or self.rate == 0.0:
            return x
        if self.rate == 1.0:  # as flax: no key drawn, so later layers' keys stay flax's
            return jnp.zeros_like(x)
        return dropout(self.make_rng(self.rng_collection), self.rate, x)
