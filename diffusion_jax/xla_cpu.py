"""Which library XLA:CPU runs the convolutions with, chosen per model before JAX starts.

XLA:CPU has two convolution libraries. By default YNNPACK takes every 2-D
float32 convolution (the default of ``--xla_cpu_experimental_ynn_fusion_type``
is ``individual_dot,individual_convolution,reduce`` in jaxlib 0.10-0.12); the same
flag without ``individual_convolution`` leaves the convolutions to Eigen's
spatial convolutions and everything else on YNNPACK as before.

Which is faster depends on the layer width. Measured on the project's 2-core
AVX-512 machine (BENCHMARKS.md, change 9): Eigen runs the 35.7M DDPM UNet's
convolutions (128-256 channels, 32x32 to 8x8 maps) at 364-408 GFLOP/s forward
and 341-404 for the input gradient against YNNPACK's 312-345 and 314-342, and
its own kernel gradient at 242-342 against 55-271, which makes ddpm_cifar10
sampling 7% and training 11% faster (jaxlib 0.10; 20% faster training on
0.11 and 0.12); YNNPACK is faster on the ``tiny`` UNet's narrow layers (32-64
channels on 16x16 and 8x8 maps; level with Eigen on 0.12). The rule below is
measured at those two widths only (wider maps, e.g. 64x64, are not measured).

XLA reads the flag once, when the CPU backend starts, and applies it to every
convolution of the process: the choice follows the model, ``"auto"`` taking
Eigen when every 3x3 convolution between the stem and the head has at least
:data:`EIGEN_MIN_CHANNELS` channels (``UNetConfig.ch >= 128``).

The flag is experimental and an unknown XLA flag stops the process, so
``"auto"`` uses it only on the jaxlib versions whose default set was checked
(:data:`CHECKED_JAXLIB`), and only where JAX will run on the CPU; elsewhere it
leaves XLA's default (``tests/test_xla_cpu.py`` checks the default set on
the installed jaxlib). ``XLA_FLAGS`` that already set the flag win.

The choice is read back from ``XLA_FLAGS`` (:func:`convolutions_on_ynnpack`,
used by ``UNetConfig.conv_weight_grad="auto"``), so change ``XLA_FLAGS`` only
before JAX starts.
"""

from __future__ import annotations

import logging
import os

from diffusion_jax import allocator

FLAG = "--xla_cpu_experimental_ynn_fusion_type"
# XLA's default set (jaxlib 0.10-0.12) less `individual_convolution`.
EIGEN_FUSION_TYPES = "individual_dot,reduce"
# (major, minor) jaxlib versions whose default set is individual_dot,individual_convolution,reduce
# (tests/test_xla_cpu.py) and where Eigen trains ddpm_cifar10 faster (BENCHMARKS.md).
CHECKED_JAXLIB = ((0, 10), (0, 11), (0, 12))
EIGEN_MIN_CHANNELS = 128
LIBRARIES = ("auto", "ynnpack", "eigen")

_log = logging.getLogger(__name__)


def _jaxlib_version() -> tuple[int, int]:
    import jaxlib  # pylint: disable=g-import-not-at-top

    major, minor = jaxlib.__version__.split(".")[:2]
    return int(major), int(minor)


def choose(library: str, ch: int) -> str:
    """The convolution library for a UNet of base width ``ch``: "ynnpack" or "eigen".

    Args:
      library: "ynnpack" or "eigen" (returned as given), or "auto": "eigen"
        when ``ch >= EIGEN_MIN_CHANNELS``, JAX will run on the CPU and jaxlib
        is a version in :data:`CHECKED_JAXLIB`; "ynnpack" otherwise.
      ch: ``UNetConfig.ch``, the width of the narrowest 3x3 convolutions.

    Raises:
      ValueError: ``library`` is not one of :data:`LIBRARIES`, or ``ch`` is not an int >= 1.
    """
    if library not in LIBRARIES:
        raise ValueError(f"cpu convolutions must be one of {LIBRARIES}, got {library!r}")
    if isinstance(ch, bool) or not isinstance(ch, int) or ch < 1:
        raise ValueError(f"xla_cpu.choose: ch must be an int >= 1, got {ch!r}")
    if library != "auto":
        return library
    wide = ch >= EIGEN_MIN_CHANNELS
    return "eigen" if wide and allocator.jax_runs_on_cpu() and _jaxlib_version() in CHECKED_JAXLIB else "ynnpack"


def request(library: str) -> bool:
    """Asks XLA:CPU to run convolutions with ``library``, unless ``XLA_FLAGS`` already chose.

    "eigen" adds ``--xla_cpu_experimental_ynn_fusion_type=individual_dot,reduce``
    to ``XLA_FLAGS``; "ynnpack" is XLA's default and changes nothing. XLA reads
    the flag when the first backend starts, so this must run before anything
    touches a JAX device.

    Returns:
      True if the flag was set; False if ``library`` is "ynnpack" or
      ``XLA_FLAGS`` already set the flag (the user's choice wins).

    Raises:
      ValueError: ``library`` is not "ynnpack" or "eigen".
      RuntimeError: asked for "eigen" after a JAX backend started (the flag
        would be ignored).
    """
    if library not in ("ynnpack", "eigen"):
        raise ValueError(f"xla_cpu.request: library must be 'ynnpack' or 'eigen', got {library!r}")
    if library == "ynnpack" or _flag_value(effective_xla_flags()) is not None:
        return False
    from diffusion_jax import parallel  # pylint: disable=g-import-not-at-top

    if parallel.backend_started():
        raise RuntimeError("xla_cpu.request: a JAX backend has already started; call it before "
                           "anything touches a JAX device")
    if _jaxlib_version() not in CHECKED_JAXLIB:
        _log.warning("Eigen convolutions asked for on jaxlib %s.%s, whose XLA:CPU default fusion set "
                     "was not checked: setting %s=%s", *_jaxlib_version(), FLAG, EIGEN_FUSION_TYPES)
    add_xla_flag(f"{FLAG}={EIGEN_FUSION_TYPES}")
    return True


def effective_xla_flags() -> str:
    """``XLA_FLAGS`` as XLA reads it: the flags, or, where the value names a file (it does not
    start with "-"), the flags in that file ("" if it cannot be read: XLA reports that)."""
    value = os.environ.get("XLA_FLAGS", "")
    path = value.strip()
    if path and not path.startswith("-"):
        try:
            with open(path) as f:
                return " ".join(f.read().split())
        except OSError:
            return ""
    return value


def add_xla_flag(flag: str) -> None:
    """Appends ``flag`` to ``XLA_FLAGS``. A flag file's flags are moved into the variable with
    it: XLA takes either a file name or flags there, and appending to the name breaks it."""
    value = os.environ.get("XLA_FLAGS", "")
    path = value.strip()
    if path and not path.startswith("-") and not os.path.isfile(path):
        raise ValueError(f"XLA_FLAGS names a file XLA cannot read: {path!r} (flags must start with '--')")
    os.environ["XLA_FLAGS"] = f"{effective_xla_flags()} {flag}".strip()


def convolutions_on_ynnpack(xla_flags: str | None = None) -> bool:
    """Whether XLA:CPU runs this process's convolutions with YNNPACK, as ``XLA_FLAGS`` says.

    True unless ``XLA_FLAGS`` (or ``xla_flags``) sets :data:`FLAG` to a set
    without ``individual_convolution``; the last setting wins, as in XLA.
    """
    value = _flag_value(effective_xla_flags() if xla_flags is None else xla_flags)
    if value is None:
        return True
    return "individual_convolution" in (v.strip() for v in value.split(","))


def _flag_value(xla_flags: str) -> str | None:
    """The value :data:`FLAG` has in ``xla_flags`` (the last setting wins, as in XLA), or None."""
    value = None
    for token in xla_flags.split():
        name, _, rest = token.partition("=")
        if name == FLAG:
            value = rest.strip("\"'")
    return value
