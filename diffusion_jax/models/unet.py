"""The DDPM UNet (Ho et al. 2020, App. B) with the ADM options of Dhariwal & Nichol 2021.

Architecture (Ho et al. 2020 App. B; the original TF code ``diffusion_tf/models/unet.py``):

* a sinusoidal timestep embedding of width ``ch`` (:func:`timestep_embedding`)
  through ``Dense(4ch) -> swish -> Dense(4ch)``; with class conditioning a learned
  class embedding is added to it (Dhariwal & Nichol 2021 sec. 4);
* ``conv_in``, then per resolution level ``num_res_blocks`` residual blocks (each
  followed by self-attention when the feature map's height is in
  ``attn_resolutions``) and a downsample (all levels but the last);
* a middle ``ResBlock -> AttnBlock -> ResBlock``;
* per level on the way up ``num_res_blocks + 1`` residual blocks, each taking the
  concatenation of the current features with one skip activation from the way
  down, then an upsample (all levels but the first);
* ``GroupNorm -> swish -> conv_out``.

Every residual block's last conv, every attention output projection and
``conv_out`` start at zero, so a freshly initialised network outputs exactly 0
and every block starts as the identity (plus a learned shortcut where the width
changes). Other weights use the DDPM default: variance scaling, fan_avg, uniform.

With ``UNetConfig()`` (ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2,
attn_resolutions=(16,)) on 32x32x3 inputs the network has 35,746,307
parameters: the "35.7M" CIFAR-10 model of Ho et al. 2020 App. B.

Compute dtype: parameters are float32; activations use ``UNetConfig.dtype``
(float32 or bfloat16). GroupNorm statistics and the attention softmax are
computed in float32 whatever the compute dtype, and the output is float32.

Speed: on CPU with YNNPACK convolutions (XLA's default; :mod:`diffusion_jax.xla_cpu`
chooses), the weight gradient of the large 3x3 convolutions is computed as one
matmul per kernel tap (:func:`conv_weight_grad_by_taps`) instead of XLA's own
backward-filter convolution, which YNNPACK runs at a fifth to a third of its
forward convolution speed on 32x32 and 16x16 maps (BENCHMARKS.md).
The choice is ``UNetConfig.conv_weight_grad``; values are the same either way.
Each 2x upsampling and the 3x3 conv after it are one op on the small map
(:func:`upsample_conv3x3`): about 4 instead of 9 multiplies per output on
large maps, on any backend; 6% of the 35.7M model's FLOPs. GroupNorm
(:func:`group_norm`) is written with per-channel coefficients, both ways, so
that every pass over the activations runs along the contiguous channels.
The 1x1 projections run on the pixels as a ``[B*H*W, C]`` matrix, so that
their kernel gradients are plain matmuls (:func:`_dense`); the attention's
``q``, ``k``, ``v`` come from three matmuls, and the attention itself is two
matmuls batched over examples and heads (:func:`attention`). Dropout
(:mod:`diffusion_jax.models.dropout`) draws the masks of
``flax.linen.Dropout``, bit for bit, with the random bits written so that XLA
fuses them into the pass that applies the mask.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from collections.abc import Callable
from typing import Literal

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import xla_cpu
from diffusion_jax.models.dropout import Dropout

_NUM_GROUPS = 32  # GroupNorm groups, Ho et al. 2020 App. B
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
_ATTENTION_IMPLS = (None, "xla", "cudnn")
_CONV_WEIGHT_GRADS = ("auto", "xla", "taps")

# The DDPM TF code's default initialiser (diffusion_tf/nn.py `default_init`).
_default_init = nn.initializers.variance_scaling(1.0, "fan_avg", "uniform")
_zero_init = nn.initializers.zeros


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    """Hyperparameters of :class:`UNet`. Defaults are the DDPM CIFAR-10 model.

    Attributes:
      ch: base channel count; level ``i`` has ``ch * ch_mult[i]`` channels and the
        timestep embedding has ``4 * ch``. Must be a multiple of 32 (GroupNorm groups).
      ch_mult: channel multiplier per resolution level; there are
        ``len(ch_mult) - 1`` downsamplings, so image sides must be divisible by
        ``2 ** (len(ch_mult) - 1)``.
      num_res_blocks: residual blocks per level on the way down (the way up has one more).
      attn_resolutions: feature-map sizes (height in pixels, e.g. 16 for the 16x16
        level of a 32x32 model) at which self-attention follows each residual
        block. The middle block always has attention.
      dropout: dropout rate inside residual blocks (before the second conv), active
        only when ``train=True``.
      out_channels: output channels; ``None`` means the input's channel count.
        Pass ``2 * C`` for learned variances (Nichol & Dhariwal 2021).
      num_heads: attention heads, used when ``num_head_channels`` is None.
      num_head_channels: if set, each attention layer uses
        ``channels // num_head_channels`` heads of this width (ADM).
      scale_shift_norm: ADM adaptive group norm: the second norm of each residual
        block becomes ``norm(h) * (1 + scale) + shift`` with ``(scale, shift)``
        projected from the embedding, instead of adding the embedding before it.
      resblock_updown: ADM: down/upsample with residual blocks (average pool /
        nearest upsample inside the block) instead of a strided conv / upsample+conv.
      num_classes: if set, the model is class-conditional with a learned embedding
        of ``num_classes + 1`` entries; label ``num_classes`` is the null class
        (for classifier-free guidance, Ho & Salimans 2021).
      dtype: compute dtype, "float32" or "bfloat16". Parameters are always float32.
      attention_impl: None (the default: :func:`attention`, the XLA
        computation written as two batched matmuls), or "xla" / "cudnn",
        passed to ``jax.nn.dot_product_attention(implementation=...)``
        ("cudnn": a fused GPU kernel; needs bfloat16 and a head width cuDNN supports).
      conv_weight_grad: how the gradient of the 3x3 convolution kernels is computed:
        "xla" (XLA's backward-filter convolution), "taps" (one matmul per kernel
        tap, :func:`conv_weight_grad_by_taps`), or "auto" (on the CPU backend
        with YNNPACK convolutions, XLA's default, "taps" for the convolutions
        where it is faster there: output maps of 16x16 and up, >= 4096 output
        positions per device (the per-device batch times the output map) and
        >= 128 channels; "xla" elsewhere, and everywhere with Eigen
        convolutions, whose kernel gradient is faster than the taps:
        :mod:`diffusion_jax.xla_cpu`).
        Speed only: the gradient is the same up to float rounding. (The convolutions that
        follow a 2x upsampling always take their own path, :func:`upsample_conv3x3`.)
    """

    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 2, 2)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = (16,)
    dropout: float = 0.1
    out_channels: int | None = None
    num_heads: int = 1
    num_head_channels: int | None = None
    scale_shift_norm: bool = False
    resblock_updown: bool = False
    num_classes: int | None = None
    dtype: str = "float32"
    attention_impl: Literal["xla", "cudnn"] | None = None
    conv_weight_grad: Literal["auto", "xla", "taps"] = "auto"

    def __post_init__(self):
        # Configs often arrive with lists (YAML, ml_collections); store tuples so the
        # config stays hashable.
        for name in ("ch_mult", "attn_resolutions"):
            value = getattr(self, name)
            if not isinstance(value, (tuple, list)):
                raise TypeError(f"UNetConfig.{name} must be a tuple of ints, got {value!r}")
            object.__setattr__(self, name, tuple(value))
        if not _is_int(self.ch) or self.ch <= 0 or self.ch % _NUM_GROUPS:
            raise ValueError(f"UNetConfig.ch must be a positive multiple of {_NUM_GROUPS} "
                             f"(GroupNorm groups), got {self.ch!r}")
        if not self.ch_mult or not all(_is_int(m) and m > 0 for m in self.ch_mult):
            raise ValueError(f"UNetConfig.ch_mult must be a non-empty tuple of positive ints, "
                             f"got {self.ch_mult!r}")
        if not _is_int(self.num_res_blocks) or self.num_res_blocks < 1:
            raise ValueError(f"UNetConfig.num_res_blocks must be an int >= 1, got {self.num_res_blocks!r}")
        if not all(_is_int(r) and r > 0 for r in self.attn_resolutions):
            raise ValueError(f"UNetConfig.attn_resolutions must be positive ints, got {self.attn_resolutions!r}")
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"UNetConfig.dropout must be in [0, 1), got {self.dropout!r}")
        if self.out_channels is not None and (not _is_int(self.out_channels) or self.out_channels <= 0):
            raise ValueError(f"UNetConfig.out_channels must be a positive int or None, got {self.out_channels!r}")
        if not _is_int(self.num_heads) or self.num_heads < 1:
            raise ValueError(f"UNetConfig.num_heads must be an int >= 1, got {self.num_heads!r}")
        if self.num_head_channels is not None and (
                not _is_int(self.num_head_channels) or self.num_head_channels <= 0):
            raise ValueError(f"UNetConfig.num_head_channels must be a positive int or None, "
                             f"got {self.num_head_channels!r}")
        for name in ("scale_shift_norm", "resblock_updown"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"UNetConfig.{name} must be a bool, got {getattr(self, name)!r}")
        if self.num_classes is not None and (not _is_int(self.num_classes) or self.num_classes < 1):
            raise ValueError(f"UNetConfig.num_classes must be a positive int or None, got {self.num_classes!r}")
        if self.dtype not in _DTYPES:
            raise ValueError(f"UNetConfig.dtype must be one of {tuple(_DTYPES)}, got {self.dtype!r}")
        if self.attention_impl not in _ATTENTION_IMPLS:
            raise ValueError(f"UNetConfig.attention_impl must be one of {_ATTENTION_IMPLS}, "
                             f"got {self.attention_impl!r}")
        if self.conv_weight_grad not in _CONV_WEIGHT_GRADS:
            raise ValueError(f"UNetConfig.conv_weight_grad must be one of {_CONV_WEIGHT_GRADS}, "
                             f"got {self.conv_weight_grad!r}")

    def num_attention_heads(self, channels: int) -> int:
        """Heads of an attention layer over ``channels`` channels; raises if they do not divide."""
        if self.num_head_channels is not None:
            if channels % self.num_head_channels:
                raise ValueError(f"UNetConfig.num_head_channels={self.num_head_channels} does not divide "
                                 f"the {channels} channels of an attention layer")
            return channels // self.num_head_channels
        if channels % self.num_heads:
            raise ValueError(f"UNetConfig.num_heads={self.num_heads} does not divide "
                             f"the {channels} channels of an attention layer")
        return self.num_heads


def timestep_embedding(t: jax.Array, dim: int, *, max_period: float = 10_000.0) -> jax.Array:
    """Sinusoidal embedding of timesteps (Vaswani et al. 2017 sec. 3.5, as in DDPM's TF code).

    With ``half = dim // 2`` and frequencies ``f_i = max_period ** (-i / (half - 1))``
    for ``i = 0 .. half-1`` (so ``f_0 = 1`` and ``f_{half-1} = 1 / max_period``)::

        emb(t) = [sin(t f_0), ..., sin(t f_{half-1}), cos(t f_0), ..., cos(t f_{half-1})]

    followed by one zero column when ``dim`` is odd.

    Args:
      t: ``[B]`` timesteps (ints or floats).
      dim: embedding width, >= 4.
      max_period: the longest period, ``2 pi max_period``.

    Returns:
      ``[B, dim]`` float32 embedding.
    """
    if not _is_int(dim) or dim < 4:
        raise ValueError(f"timestep_embedding dim must be an int >= 4, got {dim!r}")
    t = jnp.asarray(t)
    if t.ndim != 1:
        raise ValueError(f"timestep_embedding expects t of shape [B], got shape {t.shape}")
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) / (half - 1) * jnp.arange(half, dtype=jnp.float32))
    angles = t.astype(jnp.float32)[:, None] * freqs[None, :]
    emb = jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


def _per_channel(*group_values: jax.Array, channels: int) -> tuple[jax.Array, ...]:
    """``[B, G]`` per-group values as ``[B, 1, 1, C]`` arrays, each group's value repeated over its channels.

    On the CPU backend the repeat is a product with the ``[G, C]`` 0/1 matrix
    that copies group ``g`` to its channels (exact at ``HIGHEST`` precision:
    one term is ``1 * v``, the others ``0 * v'``), because XLA does not fuse
    a dot into the elementwise pass over the activations that uses its
    result: that pass then reads a ``[B, C]`` array, where a fused repeat
    computes a group index per element and runs 3x slower on XLA:CPU
    (BENCHMARKS.md, change 8). A non-finite group value therefore spreads
    to all channels of its example there (``0 * inf``); elsewhere ``jnp.repeat``.
    """
    b, g = group_values[0].shape
    if jax.default_backend() != "cpu":
        return tuple(jnp.repeat(v, channels // g, axis=1)[:, None, None, :] for v in group_values)
    expand = np.kron(np.eye(g, dtype=np.float32), np.ones((1, channels // g), np.float32))
    stacked = jnp.stack(group_values).reshape(-1, g)
    per_channel = jnp.dot(stacked, expand, precision=jax.lax.Precision.HIGHEST)
    return tuple(per_channel.reshape(len(group_values), b, 1, 1, channels))


def _group_sums(v: jax.Array, num_groups: int) -> jax.Array:
    """``[B, C]`` per-channel values summed over each group's channels: ``[B, G]``."""
    return v.reshape(v.shape[0], num_groups, -1).sum(axis=-1)


def _group_stats(x: jax.Array, num_groups: int, epsilon: float) -> tuple[jax.Array, jax.Array]:
    """Mean and 1/std of NHWC float32 ``x`` per (example, group of channels): ``[B, G]`` each.

    Two-pass variance, ``mean((x - mu)^2)``, which avoids the cancellation of
    ``E[x^2] - mu^2``. Each pass reduces the pixels per channel first (a
    ``[B, C]`` sum, vectorised along the contiguous channels) and the channels
    of a group second, rather than reducing a ``[B, HW, G, C/G]`` view whose
    minor dimension is a group's few channels.
    """
    _, h, w, c = x.shape
    count = h * w * (c // num_groups)
    mean = _group_sums(jnp.sum(x, axis=(1, 2)), num_groups) / count
    (mean_c,) = _per_channel(mean, channels=c)
    squares = jnp.sum(jnp.square(x - mean_c), axis=(1, 2))
    return mean, jax.lax.rsqrt(_group_sums(squares, num_groups) / count + epsilon)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def group_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, num_groups: int, epsilon: float) -> jax.Array:
    """Group normalization (Wu & He 2018) of NHWC ``x``, in float32.

    With ``mu``, ``sigma^2`` the mean and (two-pass) variance of each example's
    group of ``C / num_groups`` channels over all pixels and ``r = 1 / sqrt(sigma^2 + epsilon)``,
    ``y = (x - mu) r scale + bias``.

    The gradient is written out (``xh = (x - mu) r`` the normalized input,
    ``d = dy * scale``, ``<.>`` the mean over a group's ``m`` entries):
    ``dx = r (d - <d> - xh <d xh>)``, ``dscale = sum dy xh``, ``dbias = sum dy``
    (sums over examples and pixels). Both directions are written with
    per-channel ``[B, C]`` coefficients, so that every pass over the
    activations is a reduction over pixels or an elementwise map along the
    contiguous channel dimension: the forward is
    ``y = (x - mu) a + bias`` with ``a = r scale``, and the gradient
    needs only the per-channel sums ``S_dy = sum dy`` and ``S_c = sum dy (x - mu)``
    (``<d> = sum_group scale S_dy / m``, ``<d xh> = r sum_group scale S_c / m``), then
    ``dx = a dy - r^2 <d xh> (x - mu) - r <d>``. On XLA:CPU that is 1.5-2.2x
    as fast for forward + backward (with the SiLU after it) as the same
    formulas on a ``[B, HW, G, C/G]`` view (BENCHMARKS.md, change 8).
    Being a ``jax.custom_vjp``, it supports reverse-mode differentiation
    (``jax.grad``, ``jax.vjp``) but not forward mode (``jax.jvp``, ``jax.jacfwd``).

    Args:
      x: ``[B, H, W, C]``, C divisible by ``num_groups``; any float dtype.
      scale, bias: ``[C]``.
      num_groups: groups of channels.
      epsilon: added to the variance.

    Returns:
      ``[B, H, W, C]`` float32.
    """
    return _group_norm_fwd(x, scale, bias, num_groups, epsilon)[0]


def _group_norm_fwd(x, scale, bias, num_groups, epsilon):
    if x.ndim != 4:
        raise ValueError(f"group_norm: x must be [B, H, W, C], got shape {x.shape}")
    c = x.shape[-1]
    xf = x.astype(jnp.float32)
    mean, inv_std = _group_stats(xf, num_groups, epsilon)
    mean_c, inv_std_c = _per_channel(mean, inv_std, channels=c)
    return (xf - mean_c) * (inv_std_c * scale) + bias, (x, mean, inv_std, scale, bias)


def _group_norm_bwd(num_groups, epsilon, residuals, dy):
    x, mean, inv_std, scale, bias = residuals
    _, h, w, c = x.shape
    m = h * w * (c // num_groups)
    (mean_c,) = _per_channel(mean, channels=c)
    centered = x.astype(jnp.float32) - mean_c  # x - mu
    dy = dy.astype(jnp.float32)
    s_dy = jnp.sum(dy, axis=(1, 2))  # [B, C]
    s_c = jnp.sum(dy * centered, axis=(1, 2))  # [B, C]
    mean_d = _group_sums(s_dy * scale, num_groups) / m  # <d>, [B, G]
    mean_dxh = inv_std * _group_sums(s_c * scale, num_groups) / m  # <d xh>, [B, G]
    # dx = r scale dy - r^2 <d xh> (x - mu) - r <d>, with r = 1 / std.
    r_c, slope_c, offset_c = _per_channel(inv_std, inv_std * inv_std * mean_dxh, inv_std * mean_d, channels=c)
    dx = dy * (r_c * scale) - centered * slope_c - offset_c
    dscale = jnp.sum(r_c[:, 0, 0, :] * s_c, axis=0)
    dbias = jnp.sum(s_dy, axis=0)
    return dx.astype(x.dtype), dscale.astype(scale.dtype), dbias.astype(bias.dtype)


group_norm.defvjp(_group_norm_fwd, _group_norm_bwd)


class GroupNorm(nn.Module):
    """:func:`group_norm` with learned ``scale`` (init 1) and ``bias`` (init 0), float32 parameters.

    The parameters are those of ``flax.linen.GroupNorm`` (same names, shapes and
    initial values); statistics are computed in float32 and the output has ``dtype``.
    """

    num_groups: int = _NUM_GROUPS
    epsilon: float = 1e-6
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        if c % self.num_groups:
            raise ValueError(f"GroupNorm: {self.num_groups} groups do not divide {c} channels")
        scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
        return group_norm(x, scale, bias, self.num_groups, self.epsilon).astype(self.dtype)


def _group_norm(dtype, name: str) -> GroupNorm:
    return GroupNorm(_NUM_GROUPS, 1e-6, dtype, name=name)


_NHWC = ("NHWC", "HWIO", "NHWC")


def conv_weight_grad_by_taps(x: jax.Array, g: jax.Array, kernel_size: tuple[int, int],
                             strides: tuple[int, int], pads) -> jax.Array:
    """Gradient w.r.t. the kernel of a 2-D NHWC/HWIO convolution, one matmul per kernel tap.

    With ``xp`` the input zero-padded by ``pads`` and stride ``s``, the
    convolution is ``y[b, p, q, o] = sum_{i, j, c} xp[b, s p + i, s q + j, c] w[i, j, c, o]``,
    so for an output cotangent ``g``::

        dL/dw[i, j, c, o] = sum_{b, p, q} xp[b, s p + i, s q + j, c] g[b, p, q, o],

    for each tap ``(i, j)`` the product ``X_ij^T G = (G^T X_ij)^T`` of the strided window
    ``X_ij`` of ``xp`` (``[B P Q, C_in]``) and ``G`` (``[B P Q, C_out]``). XLA:CPU
    runs these matmuls 1.2-3.3x as fast as its YNNPACK backward-filter convolution on
    32x32 and 16x16 maps (on smaller maps the training step gains nothing from
    them; with Eigen convolutions XLA's own is faster: see ``UNetConfig.conv_weight_grad``
    and :mod:`diffusion_jax.xla_cpu`). Products accumulate in float32.

    Args:
      x: ``[B, H, W, C_in]`` input of the convolution.
      g: ``[B, P, Q, C_out]`` cotangent of its output.
      kernel_size: ``(kh, kw)``.
      strides: ``(sh, sw)``.
      pads: ``((lo_h, hi_h), (lo_w, hi_w))`` zero padding of H and W.

    Returns:
      ``[kh, kw, C_in, C_out]`` float32.
    """
    (kh, kw), (sh, sw) = kernel_size, strides
    b, p, q, c_out = g.shape
    c_in = x.shape[-1]
    xp = jnp.pad(x, ((0, 0), tuple(pads[0]), tuple(pads[1]), (0, 0)))
    window = (b, sh * (p - 1) + 1, sw * (q - 1) + 1, c_in)

    # G^T X_ij rather than X_ij^T G, with G^T formed once for the kh * kw taps:
    # XLA:CPU hands a dot that contracts the left operand's minor dimension and
    # the right's major one to YNNPACK, and the transposed-operand or batched
    # forms to Eigen's slower matmul (BENCHMARKS.md, change 7).
    g_t = g.reshape(b * p * q, c_out).T

    def tap(index):
        i, j = index // kw, index % kw
        x_ij = jax.lax.dynamic_slice(xp, (0, i, j, 0), window)[:, ::sh, ::sw, :]
        return jnp.dot(g_t, x_ij.reshape(b * p * q, c_in), preferred_element_type=jnp.float32)

    # A loop rather than kh * kw independent matmuls: XLA would otherwise keep
    # every tap's window copy alive at once (2.3x the step's temporary memory).
    return jax.lax.map(tap, jnp.arange(kh * kw)).reshape(kh, kw, c_out, c_in).transpose(0, 1, 3, 2)


def _conv_nhwc(x, w, strides, pads):
    return jax.lax.conv_general_dilated(x, w, strides, pads, dimension_numbers=_NHWC)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv_with_tap_weight_grad(x, w, strides, pads):
    """``lax.conv_general_dilated`` (NHWC/HWIO) whose kernel gradient is computed by taps."""
    return _conv_nhwc(x, w, strides, pads)


def _conv_with_tap_weight_grad_fwd(x, w, strides, pads):
    return _conv_nhwc(x, w, strides, pads), (x, w)


def _conv_with_tap_weight_grad_bwd(strides, pads, residuals, g):
    x, w = residuals
    _, input_vjp = jax.vjp(lambda x_: _conv_nhwc(x_, w, strides, pads), x)
    (dx,) = input_vjp(g)
    dw = conv_weight_grad_by_taps(x, g, w.shape[:2], strides, pads)
    return dx, dw.astype(w.dtype)


_conv_with_tap_weight_grad.defvjp(_conv_with_tap_weight_grad_fwd, _conv_with_tap_weight_grad_bwd)


# Where the tap weight gradient makes XLA:CPU's training step faster with YNNPACK convolutions (measured on
# a 2-core Xeon, BENCHMARKS.md, changes 2 and 7): output maps of 16x16 and up with
# many output positions (the matmuls' inner dimension) and wide channels. On 8x8
# and smaller maps (no faster step, though two devices' kernels favour the taps
# there), with fewer positions, or under 128 channels, XLA's own is used.
_TAPS_MIN_POSITIONS = 4096  # B * P * Q
_TAPS_MIN_MAP = 256  # P * Q
_TAPS_MIN_CHANNELS = 128  # min(C_in, C_out)


def _taps_pay_off(lhs_shape, rhs_shape, strides) -> bool:
    b, h, w, _ = lhs_shape
    map_size = -(-h // strides[0]) * -(-w // strides[1])
    return (b * map_size >= _TAPS_MIN_POSITIONS and map_size >= _TAPS_MIN_MAP
            and min(rhs_shape[2], rhs_shape[3]) >= _TAPS_MIN_CHANNELS)


def _conv_general_dilated_taps(lhs, rhs, window_strides, padding, *, lhs_dilation=None, rhs_dilation=None,
                               dimension_numbers=None, feature_group_count=1, precision=None,
                               only_where_faster: bool = False, **kwargs):
    """A drop-in for ``lax.conv_general_dilated`` (as ``nn.Conv`` calls it) with the tap weight gradient.

    Only the plain case the UNet uses (2-D, NHWC/HWIO, no dilation, one group)
    takes the tap path, and with ``only_where_faster`` only shapes where it is
    faster on CPU (:func:`_taps_pay_off`); anything else is passed to
    ``lax.conv_general_dilated``.
    """
    plain = (lhs.ndim == 4 and feature_group_count == 1 and precision is None and not kwargs
             and all(d in (None, 1) or tuple(d) == (1, 1) for d in (lhs_dilation, rhs_dilation))
             and jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
             == jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC))
    strides = tuple(int(s) for s in window_strides)
    if not plain or (only_where_faster and not _taps_pay_off(lhs.shape, rhs.shape, strides)):
        return jax.lax.conv_general_dilated(
            lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
            dimension_numbers=dimension_numbers, feature_group_count=feature_group_count,
            precision=precision, **kwargs)
    if isinstance(padding, str):
        padding = jax.lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], strides, padding)
    pads = tuple(tuple(int(v) for v in pair) for pair in padding)
    return _conv_with_tap_weight_grad(lhs, rhs, strides, pads)


_conv_general_dilated_taps_where_faster = functools.partial(_conv_general_dilated_taps, only_where_faster=True)


def _conv_function(weight_grad: str):
    """The ``conv_general_dilated`` for ``nn.Conv`` that ``UNetConfig.conv_weight_grad`` asks for."""
    if weight_grad == "taps":
        return _conv_general_dilated_taps
    if weight_grad == "auto" and jax.default_backend() == "cpu" and xla_cpu.convolutions_on_ynnpack():
        return _conv_general_dilated_taps_where_faster
    return None  # nn.Conv's default, lax.conv_general_dilated


def _conv3x3(features: int, dtype, name: str, *, stride: int = 1, zero_init: bool = False,
             weight_grad: str = "xla") -> nn.Conv:
    # "SAME" pads (0, 1) for a stride-2 conv on an even size, as TF did in DDPM.
    return nn.Conv(features, (3, 3), strides=(stride, stride), padding="SAME", dtype=dtype,
                   kernel_init=_zero_init if zero_init else _default_init, name=name,
                   conv_general_dilated=_conv_function(weight_grad))


def _dense(features: int, dtype, name: str, *, zero_init: bool = False) -> Callable[[jax.Array], jax.Array]:
    """``nn.Dense(features)`` over the last axis, applied to the input as an ``[N, C]`` matrix.

    NHWC activations (the 1x1 shortcuts, the attention's projections) are
    flattened to ``[B*H*W, C]`` first, so that the kernel's gradient is one
    plain matmul contracting one axis. Differentiating the 4-D product
    instead contracts three axes, and XLA:CPU compiled that with a transposed
    copy of the output gradient, fused into (and so recomputed by) the
    elementwise pass that produces it (BENCHMARKS.md, change 12). The
    parameters (``name/kernel``, ``name/bias``) and values are those of
    ``nn.Dense`` on the 4-D input. The reshapes merge contiguous leading
    axes, which XLA does without a copy in its default layout (the effect
    on a GPU is not measured).
    """
    layer = nn.Dense(features, dtype=dtype, kernel_init=_zero_init if zero_init else _default_init, name=name)

    def apply(x: jax.Array) -> jax.Array:
        return layer(x.reshape(-1, x.shape[-1])).reshape(*x.shape[:-1], features)

    return apply


def _upsample_nearest_2x(x: jax.Array) -> jax.Array:
    """``[B, H, W, C] -> [B, 2H, 2W, C]``, each pixel repeated in a 2x2 block."""
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


def _phase_taps(v: jax.Array, axis: int) -> jax.Array:
    """The 3 kernel taps along ``axis`` folded into 2 per output phase: ``[2 (phase), 2 (tap), ...]``.

    Phase 0 (even output rows) reads input rows ``i - 1, i, i`` through taps
    ``0, 1, 2``; phase 1 (odd rows) reads ``i, i, i + 1``; see :func:`upsample_conv3x3`.
    """
    w0, w1, w2 = (jnp.take(v, i, axis) for i in range(3))
    return jnp.stack([jnp.stack([w0, w1 + w2]), jnp.stack([w0 + w1, w2])])


def upsample_conv3x3_kernel(kernel: jax.Array) -> jax.Array:
    """The ``[2, 2, C_in, 4 C_out]`` kernel of :func:`upsample_conv3x3`'s 2x2 convolution.

    Output channel ``(a, b, o)`` (row-major) holds output phase ``(a, b)``'s
    kernel for channel ``o``.
    """
    rows = _phase_taps(kernel, 0)  # [a, r, 3, C_in, C_out]
    both = _phase_taps(rows, 2)  # [b, s, a, r, C_in, C_out]
    c_in, c_out = kernel.shape[2:]
    return both.transpose(3, 1, 4, 2, 0, 5).reshape(2, 2, c_in, 4 * c_out)


def _patches_2x2(x: jax.Array) -> jax.Array:
    """``[B, H+1, W+1, 4 C]``: the 2x2 windows of ``x`` zero-padded by 1, taps ``(r, s)`` row-major."""
    _, h, w, _ = x.shape
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    return jnp.concatenate([xp[:, r:r + h + 1, s:s + w + 1] for r in (0, 1) for s in (0, 1)], axis=-1)


def _conv2x2_padded_xla(x: jax.Array, k: jax.Array) -> jax.Array:
    """2x2 VALID convolution of ``x`` zero-padded by 1 (``[B, H+1, W+1, N]``); XLA's gradient."""
    return jax.lax.conv_general_dilated(x, k, (1, 1), ((1, 1), (1, 1)), dimension_numbers=_NHWC)


@jax.custom_vjp
def _conv2x2_padded(x: jax.Array, k: jax.Array) -> jax.Array:
    """:func:`_conv2x2_padded_xla` with its gradient as matmuls."""
    return _conv2x2_padded_xla(x, k)


def _conv2x2_padded_fwd(x, k):
    return _conv2x2_padded(x, k), (x, k)


def _conv2x2_padded_bwd(residuals, dz):
    # As im2col matmuls (P the patches, K the [4 C, N] kernel, z = P K):
    # dK = P^T dz, dP = dz K^T, and dx collects each patch entry back to its
    # pixel. XLA:CPU's backward-filter convolution for this shape (a 2x2
    # kernel with 4x the output channels) ran one to two orders of magnitude
    # slower than these matmuls (jax 0.10, 4x4 to 16x16 maps, 128-256 channels).
    x, k = residuals
    b, h, w, c = x.shape
    n = k.shape[-1]
    dz2 = dz.reshape(-1, n)
    acc = jnp.promote_types(dz.dtype, jnp.float32)  # accumulate in at least float32
    dk = jnp.einsum("tk,tn->kn", _patches_2x2(x).reshape(-1, 4 * c), dz2, preferred_element_type=acc)
    dp = jnp.einsum("tn,kn->tk", dz2, k.reshape(4 * c, n), preferred_element_type=acc)
    dp = dp.reshape(b, h + 1, w + 1, 4, c)
    # Patch tap (r, s) at position (p, q) read padded pixel (p + r, q + s), i.e. x[p + r - 1, q + s - 1].
    dx = sum(jnp.pad(dp[..., 2 * r + s, :], ((0, 0), (r, 1 - r), (s, 1 - s), (0, 0)))[:, 1:h + 1, 1:w + 1]
             for r in (0, 1) for s in (0, 1))
    return dx.astype(x.dtype), dk.reshape(k.shape).astype(k.dtype)


_conv2x2_padded.defvjp(_conv2x2_padded_fwd, _conv2x2_padded_bwd)


def upsample_conv3x3(x: jax.Array, kernel: jax.Array, *, grad_by_matmuls: bool | None = None) -> jax.Array:
    """``conv3x3(upsample_nearest_2x(x), kernel)`` ("SAME" padding, stride 1) without the upsampled map.

    Nearest-neighbour upsampling repeats each input pixel in a 2x2 block, so
    output row ``2i + a`` of the 3x3 convolution reads upsampled rows
    ``2i + a - 1 .. 2i + a + 1``, which are input rows ``i - 1, i, i`` (``a = 0``)
    or ``i, i, i + 1`` (``a = 1``): kernel rows that read the same input row add
    up, and each output phase ``(a, b)`` is a 2x2 convolution of ``x`` with taps
    ``[w0, w1 + w2]`` (``a = 0``) or ``[w0 + w1, w2]`` (``a = 1``) along each axis.
    With ``x`` zero-padded by 1, phase ``a``'s taps start at padded row ``i + a``,
    so one 2x2 convolution with the four phases' kernels as ``4 C_out`` output
    channels (:func:`upsample_conv3x3_kernel`) gives every output:
    ``y[2i + a, 2j + b] = z[i + a, j + b, (a, b)]``. The zero padding of the
    upsampled map is the zero padding of ``x``, so borders are exact too.

    That is ``4 (1 + 1/H)(1 + 1/W)`` multiplies per output and input channel
    instead of 9 (the convolution runs on ``(H + 1)(W + 1)`` positions for
    ``4 H W`` outputs): 4.5 from a 16x16 map, 6.25 from 4x4; and the
    ``[B, 2H, 2W, C]`` upsampled map is never written. Equal to the
    upsample-then-convolve formula up to float rounding (the tap sums, done
    in at least float32 before the kernel is cast to ``x``'s dtype).

    Args:
      x: ``[B, H, W, C_in]``; its dtype is the compute dtype.
      kernel: ``[3, 3, C_in, C_out]`` (HWIO), any float dtype.
      grad_by_matmuls: compute the gradient as im2col matmuls (see
        ``_conv2x2_padded``) rather than by XLA's convolution gradients.
        Default: on the CPU backend, where XLA's kernel gradient for this
        shape is very slow; XLA's (cuDNN's) elsewhere.

    Returns:
      ``[B, 2H, 2W, C_out]``.
    """
    if x.ndim != 4 or kernel.ndim != 4 or kernel.shape[:2] != (3, 3) or kernel.shape[2] != x.shape[-1]:
        raise ValueError(f"upsample_conv3x3: needs x [B, H, W, C] and kernel [3, 3, C, C_out], "
                         f"got {x.shape} and {kernel.shape}")
    if grad_by_matmuls is None:
        grad_by_matmuls = jax.default_backend() == "cpu"
    b, h, w, _ = x.shape
    c_out = kernel.shape[-1]
    folded = upsample_conv3x3_kernel(kernel.astype(jnp.promote_types(kernel.dtype, jnp.float32)))
    conv = _conv2x2_padded if grad_by_matmuls else _conv2x2_padded_xla
    z = conv(x, folded.astype(x.dtype)).reshape(b, h + 1, w + 1, 2, 2, c_out)
    rows = [jnp.stack([z[:, a:a + h, s:s + w, a, s] for s in (0, 1)], axis=3) for a in (0, 1)]
    return jnp.stack(rows, axis=2).reshape(b, 2 * h, 2 * w, c_out)


class UpsampleConv(nn.Module):
    """Nearest 2x upsampling followed by a 3x3 conv, as :func:`upsample_conv3x3`.

    The parameters are those of the ``nn.Conv(features, (3, 3), padding="SAME")``
    it replaces (``kernel`` ``[3, 3, C_in, features]``, ``bias`` ``[features]``;
    same names, shapes and initialisers), so checkpoints are interchangeable.
    """

    features: int
    dtype: jnp.dtype = jnp.float32
    zero_init: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param("kernel", _zero_init if self.zero_init else _default_init,
                            (3, 3, x.shape[-1], self.features), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,), jnp.float32)
        x, bias = nn.dtypes.promote_dtype(x, bias, dtype=self.dtype)
        return upsample_conv3x3(x, kernel) + bias  # the taps are summed in float32, then cast


def _avg_pool_2x(x: jax.Array) -> jax.Array:
    """``[B, H, W, C] -> [B, H/2, W/2, C]``, the mean of each 2x2 block."""
    return nn.avg_pool(x, (2, 2), strides=(2, 2))


class ResBlock(nn.Module):
    """Residual block (Ho et al. 2020 App. B; ADM options from Dhariwal & Nichol 2021 sec. 3).

    ``h = conv1(swish(norm1(x))) + Dense(swish(emb))``, ``h = swish(norm2(h))`` (or with
    ``scale_shift_norm``: ``h = swish(norm2(conv1(...)) * (1 + scale) + shift)``),
    ``h = conv2(dropout(h))`` with conv2 zero-initialised, and the output is
    ``shortcut(x) + h``, where the shortcut is a 1x1 projection ("NIN") when the
    channel count changes. With ``resample`` the block also halves ("down", average
    pooling) or doubles ("up", nearest) the spatial size, applied to both paths after
    the first norm, as in ADM's ``resblock_updown``.
    """

    out_ch: int
    dropout: float
    scale_shift_norm: bool = False
    resample: Literal["up", "down"] | None = None
    dtype: jnp.dtype = jnp.float32
    conv_weight_grad: str = "auto"  # see UNetConfig.conv_weight_grad

    @nn.compact
    def __call__(self, x: jax.Array, emb: jax.Array, *, train: bool) -> jax.Array:
        h = nn.swish(_group_norm(self.dtype, "norm1")(x))
        if self.resample == "up":
            h, x = UpsampleConv(self.out_ch, self.dtype, name="conv1")(h), _upsample_nearest_2x(x)
        else:
            if self.resample == "down":
                h, x = _avg_pool_2x(h), _avg_pool_2x(x)
            h = _conv3x3(self.out_ch, self.dtype, "conv1", weight_grad=self.conv_weight_grad)(h)

        emb_features = 2 * self.out_ch if self.scale_shift_norm else self.out_ch
        emb_out = _dense(emb_features, self.dtype, "temb_proj")(nn.swish(emb))[:, None, None, :]
        if self.scale_shift_norm:
            scale, shift = jnp.split(emb_out, 2, axis=-1)
            h = _group_norm(self.dtype, "norm2")(h) * (1 + scale) + shift
        else:
            h = _group_norm(self.dtype, "norm2")(h + emb_out)
        h = nn.swish(h)
        h = Dropout(self.dropout)(h, deterministic=not train)
        h = _conv3x3(self.out_ch, self.dtype, "conv2", zero_init=True, weight_grad=self.conv_weight_grad)(h)

        if x.shape[-1] != self.out_ch:
            x = _dense(self.out_ch, self.dtype, "nin_shortcut")(x)
        return x + h


class _DenseParts(nn.Module):
    """``nn.Dense(sum(features))`` on ``[N, C]`` inputs, its output returned in parts, one matmul each.

    The parameters (``kernel`` ``[C, sum(features)]``, ``bias``) and the
    dtype handling are those of ``nn.Dense(sum(features))``; part ``i`` is
    ``x @ kernel[:, a:b] + bias[a:b]`` for its columns ``[a, b)``. Each
    part's columns are initialised as a layer of their own,
    ``_default_init`` of ``[C, features[i]]``: DDPM's attention has three
    projections ``q``, ``k``, ``v`` of ``[C, C]`` each (fan_avg C), where one
    ``[C, 3C]`` kernel's fan_avg (2C) would start them at 1/sqrt(2) of that
    scale. Each part is then a contiguous array: the attention's ``q``,
    ``k``, ``v`` split from one ``[N, 3C]`` product would be strided slices,
    which XLA:CPU copies out before the attention's matmuls (BENCHMARKS.md,
    change 13).
    """

    features: tuple[int, ...]
    dtype: jnp.dtype = jnp.float32

    def _init_parts(self, key, shape, dtype):
        keys = jax.random.split(key, len(self.features))
        return jnp.concatenate([_default_init(k, (shape[0], f), dtype) for k, f in zip(keys, self.features)],
                               axis=1)

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, ...]:
        if x.ndim != 2:
            raise ValueError(f"_DenseParts: x must be [N, C], got shape {x.shape}")
        kernel = self.param("kernel", self._init_parts, (x.shape[-1], sum(self.features)), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (sum(self.features),), jnp.float32)
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        bounds = itertools.pairwise(itertools.accumulate(self.features, initial=0))
        return tuple(jnp.dot(x, kernel[:, lo:hi]) + bias[lo:hi] for lo, hi in bounds)


def attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """Softmax attention per head, ``softmax(q k^T / sqrt(d)) v`` (Vaswani et al. 2017, Eq. 1).

    What ``jax.nn.dot_product_attention``'s XLA implementation computes (no
    mask or bias): logits accumulated in float32 (bfloat16 inputs: bfloat16
    products, float32 sums) and scaled by ``1 / sqrt(d)``, the softmax in
    float32, the probabilities cast to ``v``'s dtype for the second product.
    Written as two batched matmuls over the batch and head dimensions
    (``dot_general``), where JAX's einsums over ``[B, T, N, D]`` with a vmap
    over head groups made XLA:CPU copy and transpose the probabilities
    (BENCHMARKS.md, change 13). A single head is not squeezed to
    ``[B, T, D]``: that form let XLA:CPU hand the projections, both products
    and the softmax to YNNPACK as one fusion: faster at 8 examples per
    device, slower than JAX's form at 16.

    Args:
      q: ``[B, T, N, D]`` queries (``N`` heads of width ``D``).
      k, v: ``[B, S, N, D]`` keys and values, the dtype of ``q``.

    Returns:
      ``[B, T, N, D]``, the dtype of ``v``.
    """
    if (q.ndim != 4 or k.ndim != 4 or k.shape != v.shape
            or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]):
        raise ValueError(f"attention: q [B, T, N, D] and k, v [B, S, N, D] expected, "
                         f"got {q.shape}, {k.shape}, {v.shape}")
    precision = jax.lax.DotAlgorithmPreset.BF16_BF16_F32 if q.dtype == jnp.bfloat16 else None
    logits = jax.lax.dot_general(q, k, (((3,), (3,)), ((0, 2), (0, 2))),  # -> [B, N, T, S]
                                 precision=precision, preferred_element_type=jnp.float32)
    probs = jax.nn.softmax(logits * np.float32(1 / math.sqrt(q.shape[3])), axis=-1).astype(v.dtype)
    out = jax.lax.dot_general(probs, v, (((3,), (1,)), ((0, 1), (0, 2))))  # [B, N, T, S] x [B, S, N, D]
    return out.transpose(0, 2, 1, 3)  # [B, N, T, D] -> [B, T, N, D]


class AttnBlock(nn.Module):
    """Self-attention over all pixels with a residual connection (Ho et al. 2020 App. B).

    ``h = norm(x)``; ``q, k, v = h W_q, h W_k, h W_v`` (the 1x1 projection
    ``qkv``, one kernel ``[C, 3C]``, applied as three matmuls: :class:`_DenseParts`);
    per head, ``softmax(q k^T / sqrt(d)) v`` over the ``H*W`` positions, with
    heads taking contiguous ``d``-channel slices; the output is
    ``x + proj_out(attn)`` with ``proj_out`` zero-initialised. The softmax
    runs in float32. ``attention_impl=None`` computes the attention with
    :func:`attention`; ``"xla"`` or ``"cudnn"`` with
    ``jax.nn.dot_product_attention`` and that implementation (``"cudnn"``: a
    fused GPU kernel).
    """

    num_heads: int = 1
    dtype: jnp.dtype = jnp.float32
    attention_impl: Literal["xla", "cudnn"] | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, height, width, c = x.shape
        if c % self.num_heads:
            raise ValueError(f"AttnBlock: num_heads={self.num_heads} does not divide {c} channels")
        h = _group_norm(self.dtype, "norm")(x)
        q, k, v = (a.reshape(b, height * width, self.num_heads, c // self.num_heads)
                   for a in _DenseParts((c, c, c), self.dtype, name="qkv")(h.reshape(-1, c)))
        if self.attention_impl is None:
            h = attention(q, k, v)
        else:
            h = jax.nn.dot_product_attention(q, k, v, implementation=self.attention_impl)
        h = h.reshape(b, height, width, c)
        return x + _dense(c, self.dtype, "proj_out", zero_init=True)(h)


class Downsample(nn.Module):
    """Halve the spatial size with a stride-2 3x3 conv (Ho et al. 2020, DDPM TF code)."""

    dtype: jnp.dtype = jnp.float32
    conv_weight_grad: str = "auto"  # see UNetConfig.conv_weight_grad

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return _conv3x3(x.shape[-1], self.dtype, "conv", stride=2, weight_grad=self.conv_weight_grad)(x)


class Upsample(nn.Module):
    """Double the spatial size: nearest-neighbour repeat, then a 3x3 conv (Ho et al. 2020).

    Computed as one op on the low-resolution map (:class:`UpsampleConv`).
    """

    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return UpsampleConv(x.shape[-1], self.dtype, name="conv")(x)


class UNet(nn.Module):
    """The DDPM/ADM UNet noise-prediction network; see the module docstring.

    Call with ``rngs={"dropout": key}`` when ``train=True`` and ``config.dropout > 0``.

    Differentiable in reverse mode (``jax.grad``, ``jax.vjp``: training, and
    likelihoods by Hutchinson's trace estimator), not in forward mode
    (``jax.jvp``, ``jax.jacfwd``): its GroupNorm, convolution-kernel gradient and
    upsampling layers are ``jax.custom_vjp`` functions written for the
    training step's speed.
    """

    config: UNetConfig

    @nn.compact
    def __call__(self, x: jax.Array, t: jax.Array, y: jax.Array | None = None, *, train: bool) -> jax.Array:
        """Predict the network output for noisy images.

        Args:
          x: ``[B, H, W, C]`` float images; H and W divisible by ``2 ** (len(ch_mult) - 1)``.
          t: ``[B]`` int timestep indices (0-based, as in the diffusion schedule).
          y: ``[B]`` int class labels in ``[0, num_classes]`` (``num_classes`` is the
            null class); required exactly when ``config.num_classes`` is set.
            Checked where concrete; under ``jit`` a label out of range gives
            that example a NaN output.
          train: enables dropout.

        Returns:
          ``[B, H, W, out_channels]`` float32.
        """
        cfg = self.config
        self._check_inputs(x, t, y)
        dtype = _DTYPES[cfg.dtype]
        num_levels = len(cfg.ch_mult)
        out_channels = cfg.out_channels or x.shape[-1]

        def res_block(h, out_ch, name, resample=None):
            block = ResBlock(out_ch, cfg.dropout, cfg.scale_shift_norm, resample, dtype,
                             cfg.conv_weight_grad, name=name)
            return block(h, emb, train=train)

        def attn_block(h, name):
            heads = cfg.num_attention_heads(h.shape[-1])
            return AttnBlock(heads, dtype, cfg.attention_impl, name=name)(h)

        # Timestep (and class) embedding, [B, 4ch].
        emb = timestep_embedding(t, cfg.ch)
        emb = _dense(4 * cfg.ch, dtype, "temb_dense0")(emb)
        emb = _dense(4 * cfg.ch, dtype, "temb_dense1")(nn.swish(emb))
        if cfg.num_classes is not None:
            # Traced labels are not range-checked (_check_inputs): one outside [0, num_classes],
            # negative ones included (which indexing would wrap to the null class), looks up
            # out of bounds, which JAX fills with NaN, so it shows in the output.
            y = jnp.where((y >= 0) & (y <= cfg.num_classes), y, cfg.num_classes + 1)
            emb = emb + nn.Embed(cfg.num_classes + 1, 4 * cfg.ch, dtype=dtype, name="class_embed")(y)

        # Down: keep every activation for the skip connections.
        hs = [_conv3x3(cfg.ch, dtype, "conv_in", weight_grad=cfg.conv_weight_grad)(x.astype(dtype))]
        for level, mult in enumerate(cfg.ch_mult):
            for i in range(cfg.num_res_blocks):
                h = res_block(hs[-1], cfg.ch * mult, f"down_{level}_block_{i}")
                if h.shape[1] in cfg.attn_resolutions:
                    h = attn_block(h, f"down_{level}_attn_{i}")
                hs.append(h)
            if level != num_levels - 1:
                if cfg.resblock_updown:
                    hs.append(res_block(hs[-1], hs[-1].shape[-1], f"down_{level}_downsample", "down"))
                else:
                    hs.append(Downsample(dtype, cfg.conv_weight_grad, name=f"down_{level}_downsample")(hs[-1]))

        h = res_block(hs[-1], hs[-1].shape[-1], "mid_block_1")
        h = attn_block(h, "mid_attn")
        h = res_block(h, h.shape[-1], "mid_block_2")

        # Up: num_res_blocks + 1 blocks per level, each consuming one skip.
        for level in reversed(range(num_levels)):
            for i in range(cfg.num_res_blocks + 1):
                h = res_block(jnp.concatenate([h, hs.pop()], axis=-1), cfg.ch * cfg.ch_mult[level],
                              f"up_{level}_block_{i}")
                if h.shape[1] in cfg.attn_resolutions:
                    h = attn_block(h, f"up_{level}_attn_{i}")
            if level != 0:
                if cfg.resblock_updown:
                    h = res_block(h, h.shape[-1], f"up_{level}_upsample", "up")
                else:
                    h = Upsample(dtype, name=f"up_{level}_upsample")(h)
        assert not hs, "every skip activation is consumed on the way up"

        h = nn.swish(_group_norm(dtype, "norm_out")(h))
        h = _conv3x3(out_channels, dtype, "conv_out", zero_init=True, weight_grad=cfg.conv_weight_grad)(h)
        return h.astype(jnp.float32)

    def _check_inputs(self, x, t, y) -> None:
        """Shape checks (static under jit, so free); raise before any layer is built."""
        cfg = self.config
        for name, a in (("x", x), ("t", t), ("y", y)):
            if a is not None and not hasattr(a, "shape"):
                raise TypeError(f"UNet: {name} must be an array, got {type(a).__name__}")
        if x.ndim != 4:
            raise ValueError(f"UNet: x must have rank 4 [B, H, W, C], got shape {tuple(x.shape)}")
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise TypeError(f"UNet: x must be a floating-point array, got dtype {x.dtype}")
        b, height, width, _ = x.shape
        factor = 2 ** (len(cfg.ch_mult) - 1)
        if height % factor or width % factor:
            raise ValueError(f"UNet: image size {height}x{width} must be divisible by {factor} "
                             f"= 2**(len(ch_mult) - 1) for ch_mult={cfg.ch_mult}")
        if tuple(t.shape) != (b,):
            raise ValueError(f"UNet: t must have shape [B] = ({b},), got {tuple(t.shape)}")
        if cfg.num_classes is None:
            if y is not None:
                raise ValueError("UNet: labels y were passed but UNetConfig.num_classes is None")
        else:
            if y is None:
                raise ValueError(f"UNet: UNetConfig.num_classes={cfg.num_classes} needs labels y of shape [B] "
                                 f"(use label {cfg.num_classes} for the null class)")
            if tuple(y.shape) != (b,) or not jnp.issubdtype(y.dtype, jnp.integer):
                raise ValueError(f"UNet: y must be an int array of shape [B] = ({b},), "
                                 f"got shape {tuple(y.shape)} dtype {y.dtype}")
            if not isinstance(y, jax.core.Tracer) and not np.all((np.asarray(y) >= 0) & (np.asarray(y) <= cfg.num_classes)):
                raise ValueError(f"UNet: labels y must be in [0, {cfg.num_classes}] "
                                 f"({cfg.num_classes} = null class), got {y}")
        # Attention widths: each level with attention, and the middle block (last level).
        for level, mult in enumerate(cfg.ch_mult):
            if height >> level in cfg.attn_resolutions or level == len(cfg.ch_mult) - 1:
                cfg.num_attention_heads(cfg.ch * mult)
