"""Where training output goes: TensorBoard events, console progress, PNG grids.

The only module that writes logs, TensorBoard files or images (STYLE.md, "each
dependency has one home"). TensorBoard event files are written with
tensorboardX, so TensorFlow is never needed. In a multi-process job only the
primary process (``jax.process_index() == 0``) writes or prints; the others
get silent no-op objects, so callers need no ``if`` of their own.

Values are converted to Python floats (a device-to-host transfer) only when
they are actually written or printed.
"""

from __future__ import annotations

import io
import math
import os
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any, TextIO

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from diffusion_jax import _files
from diffusion_jax._checks import as_step

_IMAGE_CHANNELS = (1, 3, 4)


class MetricWriter:
    """Writes scalars and images to TensorBoard event files in ``logdir``.

    Example::

      writer = MetricWriter(workdir / "tensorboard")
      writer.write_scalars(step, {"train/loss": loss, "train/lr": lr})
      writer.write_images(step, {"samples": image_grid(samples)})
      writer.close()
    """

    def __init__(self, logdir: os.PathLike | str, *, enabled: bool = True):
        """Opens an event file in ``logdir`` on the primary process when enabled."""
        self._writer = None
        if enabled and jax.process_index() == 0:
            # Imported here: tensorboardX imports torch when it is installed, which
            # takes seconds that a disabled writer or an importer should not pay.
            import tensorboardX

            logdir = os.fspath(logdir)
            if "://" not in logdir:
                os.makedirs(logdir, exist_ok=True)
            self._writer = tensorboardX.SummaryWriter(logdir=logdir, flush_secs=60)

    @property
    def enabled(self) -> bool:
        return self._writer is not None

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        """Adds one point per scalar at ``step`` (values: floats or 0-d arrays)."""
        step = as_step(step)
        _check_names(scalars, "scalars")
        if self._writer is None:
            return
        for name, value in scalars.items():
            self._writer.add_scalar(name, _scalar(value, name), global_step=step)

    def write_images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
        """Adds one image per name at ``step``; each uint8 ``[H, W, C]``, C in 1, 3, 4.

        TensorBoard shows single-channel images as grey RGB.
        """
        step = as_step(step)
        _check_names(images, "images")
        checked = {name: _check_uint8_image(image, name) for name, image in images.items()}
        if self._writer is None:
            return
        for name, image in checked.items():
            self._writer.add_image(name, image, global_step=step, dataformats="HWC")

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> MetricWriter:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


class ProgressLogger:
    """Console progress: step, metrics, steps/s, images/s and time left.

    Call ``update`` every step; it prints every ``every_steps`` steps and at the
    last step. Rates are measured between consecutive printed steps; the first
    call only sets the reference time, so the compilation of the first step is
    not counted, and time reported by :meth:`exclude` (evaluations, samples) is
    left out. Metrics are converted to floats on printed steps only. On a
    terminal the output is one progress bar line rewritten in place; otherwise
    one plain line per print, e.g.::

      step 2000/800000 (0.2%) | loss 0.03125 | 10.52 steps/s | 1346.6 img/s | ETA 21:04:15
    """

    def __init__(
        self,
        num_train_steps: int,
        *,
        batch_size: int,
        every_steps: int,
        enabled: bool = True,
        stream: TextIO | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        """Sets up the logger.

        Args:
          num_train_steps: the step at which training ends.
          batch_size: examples per step over all devices (for images/s).
          every_steps: print when ``step % every_steps == 0``.
          enabled: print at all (only on the primary process in any case).
          stream: where to write; default ``sys.stderr``.
          clock: seconds, monotonic (for tests).
        """
        for name, value in (
            ("num_train_steps", num_train_steps),
            ("batch_size", batch_size),
            ("every_steps", every_steps),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}.")
        self._num_train_steps = num_train_steps
        self._batch_size = batch_size
        self._every_steps = every_steps
        self._enabled = enabled and jax.process_index() == 0
        self._stream = sys.stderr if stream is None else stream
        self._clock = clock
        self._tty = bool(getattr(self._stream, "isatty", lambda: False)())
        self._last: tuple[int, float] | None = None
        self._excluded = 0.0

    def exclude(self, seconds: float) -> None:
        """Leaves ``seconds`` spent on something other than training out of the next rate."""
        if self._last is not None:  # before the first update there is no interval yet
            self._excluded += max(float(seconds), 0.0)

    def update(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Records that ``step`` (a Python int) finished; prints on print steps only."""
        if not self._enabled:
            return
        step = as_step(step)
        now = self._clock()
        if self._last is None:
            self._last = (step, now)
        if step % self._every_steps and step != self._num_train_steps:
            return
        last_step, last_time = self._last
        elapsed = now - last_time - self._excluded
        steps_per_sec = None
        if step > last_step and elapsed > 0:
            steps_per_sec = (step - last_step) / elapsed
        self._last, self._excluded = (step, now), 0.0
        line = self._format(step, metrics, steps_per_sec)
        if self._tty:
            end = "\n" if step >= self._num_train_steps else ""
            self._stream.write(f"\r{self._bar(step)} {line}\x1b[K{end}")
        else:
            self._stream.write(line + "\n")
        self._stream.flush()

    def _format(self, step, metrics, steps_per_sec) -> str:
        fraction = step / self._num_train_steps
        parts = [f"step {step}/{self._num_train_steps} ({100 * fraction:.1f}%)"]
        parts += [f"{name} {_scalar(value, name):.4g}" for name, value in metrics.items()]
        if steps_per_sec is None:
            parts += ["- steps/s", "- img/s", "ETA -"]
        else:
            remaining = max(self._num_train_steps - step, 0) / steps_per_sec
            parts += [
                f"{steps_per_sec:.2f} steps/s",
                f"{steps_per_sec * self._batch_size:.1f} img/s",
                f"ETA {_hms(remaining)}",
            ]
        return " | ".join(parts)

    def _bar(self, step: int, width: int = 30) -> str:
        filled = min(width, int(width * step / self._num_train_steps))
        return "[" + "#" * filled + "-" * (width - filled) + "]"


def image_grid(images: Any, *, ncols: int | None = None, padding: int = 1) -> np.ndarray:
    """Tiles images in [-1, 1] into one uint8 image.

    Pixel values map as ``round((x + 1) * 127.5)`` (halves to even) clipped to [0, 255], the
    inverse of the usual ``x = pixel / 127.5 - 1`` data scaling (Ho et al. 2020,
    sec. 3.3). Images fill rows left to right; ``padding`` pixels of 0 separate
    them and surround the grid (as torchvision's ``make_grid``), and unused cells
    of the last row stay 0.

    Args:
      images: ``[N, H, W, C]`` floats in [-1, 1] (numpy or jax).
      ncols: images per row; default ``ceil(sqrt(N))``.
      padding: pixels between and around images.

    Returns:
      uint8 ``[rows * (H + padding) + padding, ncols * (W + padding) + padding,
      C]`` with ``rows = ceil(N / ncols)``; C is kept (1 stays 1).
    """
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[0] == 0:
        raise ValueError(f"images must be [N, H, W, C] with N >= 1, got shape {images.shape}.")
    if not jnp.issubdtype(images.dtype, jnp.floating):  # bfloat16 too, which NumPy does not call floating
        raise TypeError(f"images must be floats in [-1, 1], got {images.dtype}.")
    images = images.astype(np.float64)
    if not np.all(np.isfinite(images)):
        raise ValueError("images contain NaN or infinite values.")
    n, height, width, channels = images.shape
    if ncols is None:
        ncols = math.ceil(math.sqrt(n))
    if isinstance(ncols, np.integer):
        ncols = int(ncols)
    if isinstance(ncols, bool) or not isinstance(ncols, int) or ncols < 1:
        raise ValueError(f"ncols must be a positive int, got {ncols!r}.")
    if isinstance(padding, bool) or not isinstance(padding, int) or padding < 0:
        raise ValueError(f"padding must be an int >= 0, got {padding!r}.")
    pixels = np.clip(np.round((images.astype(np.float64) + 1.0) * 127.5), 0, 255)
    pixels = pixels.astype(np.uint8)
    nrows = math.ceil(n / ncols)
    grid = np.zeros(
        (nrows * (height + padding) + padding, ncols * (width + padding) + padding, channels),
        np.uint8,
    )
    for i in range(n):
        row, col = divmod(i, ncols)
        top = padding + row * (height + padding)
        left = padding + col * (width + padding)
        grid[top : top + height, left : left + width] = pixels[i]
    return grid


def save_png(path: os.PathLike | str, grid: np.ndarray) -> None:
    """Writes a uint8 ``[H, W, C]`` image (C in 1, 3, 4) as a PNG file.

    Creates the parent folder; ``path`` may be local or a URL (``gs://...``,
    through ``etils.epath``). C=1 is written as 8-bit greyscale.
    """
    grid = _check_uint8_image(np.asarray(grid), "grid")
    buffer = io.BytesIO()
    Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid).save(buffer, format="PNG")
    _files.write_file(path, buffer.getvalue())


def _scalar(value: Any, name: str) -> float:
    value = np.asarray(value)
    if value.size != 1:
        raise ValueError(f"{name}: expected a scalar, got shape {value.shape}.")
    return float(value.reshape(()))


def _check_names(values: Mapping[str, Any], what: str) -> None:
    if not isinstance(values, Mapping):
        raise TypeError(f"{what} must be a mapping of name -> value.")
    for name in values:
        if not isinstance(name, str) or not name:
            raise TypeError(f"{what} names must be non-empty strings, got {name!r}.")


def _check_uint8_image(image: Any, name: str) -> np.ndarray:
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise TypeError(f"{name}: image must be uint8, got {image.dtype}.")
    if image.ndim != 3 or image.shape[-1] not in _IMAGE_CHANNELS:
        raise ValueError(f"{name}: image must be [H, W, C] with C in {_IMAGE_CHANNELS}, got shape {image.shape}.")
    return image


def _hms(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}"
