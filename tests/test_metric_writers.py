"""Tests for diffusion_jax.metric_writers: event files, progress lines, grids, PNGs."""

import io
import struct

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from diffusion_jax.metric_writers import MetricWriter, ProgressLogger, image_grid, save_png

# ---------------------------------------------------------------- TFRecord


def _crc32c_table():
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)
    return table


_CRC_TABLE = _crc32c_table()


def _masked_crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli), masked as TFRecord does."""
    crc = 0xFFFFFFFF
    for b in data:
        crc = _CRC_TABLE[(crc ^ b) & 0xFF] ^ (crc >> 8)
    crc ^= 0xFFFFFFFF
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def test_crc32c_matches_the_published_check_value():
    # RFC 3720 B.4: CRC-32C of 32 zero bytes is 0x8A9136AA; check it unmasked.
    masked = _masked_crc32c(bytes(32))
    unmasked = (masked - 0xA282EAD8) & 0xFFFFFFFF
    unmasked = ((unmasked << 15) | (unmasked >> 17)) & 0xFFFFFFFF
    assert unmasked == 0x8A9136AA


def _read_events(logdir):
    """Parses every record of the one event file in logdir, checking CRCs."""
    from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top

    files = sorted(logdir.glob("events.out.tfevents.*"))
    assert len(files) == 1, files
    data = files[0].read_bytes()
    events, offset = [], 0
    while offset < len(data):
        header = data[offset : offset + 8]
        (length,) = struct.unpack("<Q", header)
        (header_crc,) = struct.unpack("<I", data[offset + 8 : offset + 12])
        assert header_crc == _masked_crc32c(header)
        payload = data[offset + 12 : offset + 12 + length]
        (payload_crc,) = struct.unpack("<I", data[offset + 12 + length : offset + 16 + length])
        assert payload_crc == _masked_crc32c(payload)
        events.append(event_pb2.Event.FromString(payload))
        offset += 16 + length
    assert offset == len(data)
    return events


def test_scalars_and_images_round_trip_through_the_event_file(tmp_path):
    rgb = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3) * 14
    grey = np.array([[[0], [255]], [[128], [7]]], np.uint8)
    with MetricWriter(tmp_path) as writer:
        writer.write_scalars(3, {"train/loss": 0.25, "train/lr": jnp.float32(1e-4)})
        writer.write_scalars(7, {"train/loss": np.float64(1 / 3)})
        writer.write_images(7, {"samples": rgb, "grey": grey})
    events = _read_events(tmp_path)
    assert events[0].file_version == "brain.Event:2"
    values = [(e.step, v) for e in events[1:] for v in e.summary.value]
    scalars = [(step, v.tag, v.simple_value) for step, v in values if v.HasField("simple_value")]
    assert scalars == [
        (3, "train/loss", 0.25),
        (3, "train/lr", pytest.approx(float(np.float32(1e-4)), rel=1e-7)),
        (7, "train/loss", pytest.approx(float(np.float32(1 / 3)), rel=1e-7)),
    ]
    images = {v.tag: (step, v.image) for step, v in values if v.HasField("image")}
    assert set(images) == {"samples", "grey"}
    step, summary = images["samples"]
    assert (step, summary.height, summary.width) == (7, 2, 3)
    decoded = np.asarray(Image.open(io.BytesIO(summary.encoded_image_string)))
    np.testing.assert_array_equal(decoded, rgb)
    decoded = np.asarray(Image.open(io.BytesIO(images["grey"][1].encoded_image_string)))
    np.testing.assert_array_equal(decoded, np.repeat(grey, 3, axis=-1))  # shown as grey RGB


def test_disabled_writer_writes_nothing_but_still_checks_input(tmp_path):
    writer = MetricWriter(tmp_path / "tb", enabled=False)
    assert not writer.enabled
    writer.write_scalars(1, {"loss": 1.0})
    writer.write_images(1, {"x": np.zeros((2, 2, 3), np.uint8)})
    with pytest.raises(TypeError, match="uint8"):
        writer.write_images(1, {"x": np.zeros((2, 2, 3), np.float32)})
    writer.close()
    assert not (tmp_path / "tb").exists()


def test_writer_rejects_bad_input(tmp_path):
    with MetricWriter(tmp_path) as writer:
        with pytest.raises(ValueError, match=r"\[H, W, C\]"):
            writer.write_images(0, {"x": np.zeros((2, 2), np.uint8)})
        with pytest.raises(ValueError, match="C in"):
            writer.write_images(0, {"x": np.zeros((2, 2, 2), np.uint8)})
        with pytest.raises(ValueError, match="scalar"):
            writer.write_scalars(0, {"loss": np.zeros(3)})
        with pytest.raises(TypeError, match="names"):
            writer.write_scalars(0, {3: 1.0})
        with pytest.raises(ValueError, match=">= 0"):
            writer.write_scalars(-1, {"loss": 1.0})
        with pytest.raises(TypeError, match="int"):
            writer.write_scalars(1.5, {"loss": 1.0})


# ---------------------------------------------------------------- progress


class _FakeClock:
    def __init__(self, times):
        self._times = iter(times)

    def __call__(self):
        return next(self._times)


class _Tty(io.StringIO):
    def isatty(self):
        return True


class _NoFloat:
    def __float__(self):
        raise AssertionError("converted to float on a step that does not print")

    def __array__(self, dtype=None, copy=None):
        raise AssertionError("converted on a step that does not print")


def test_progress_prints_plain_lines_with_rates_and_eta():
    stream = io.StringIO()
    # Calls at steps 1, 5, 10, 20 at times 0, 1, 3, 8 seconds.
    logger = ProgressLogger(100, batch_size=8, every_steps=10, stream=stream, clock=_FakeClock([0.0, 1.0, 3.0, 8.0]))
    logger.update(1, {"loss": _NoFloat()})
    logger.update(5, {"loss": _NoFloat()})
    logger.update(10, {"loss": 0.5, "grad_norm": jnp.float32(2.0)})
    logger.update(20, {"loss": 0.25})
    lines = stream.getvalue().splitlines()
    # Step 10: 9 steps in 3 s = 3 steps/s = 24 img/s; 90 steps left = 30 s.
    assert lines[0] == ("step 10/100 (10.0%) | loss 0.5 | grad_norm 2 | 3.00 steps/s | 24.0 img/s | ETA 0:00:30")
    # Step 20: 10 steps in 5 s = 2 steps/s; 80 steps left = 40 s.
    assert lines[1] == "step 20/100 (20.0%) | loss 0.25 | 2.00 steps/s | 16.0 img/s | ETA 0:00:40"
    assert len(lines) == 2


def test_progress_leaves_excluded_time_out_of_the_rate():
    stream = io.StringIO()
    # Calls at steps 10 and 20 at 0 s and 8 s, of which 6 s were an evaluation: 10 steps in 2 s.
    logger = ProgressLogger(100, batch_size=4, every_steps=10, stream=stream, clock=_FakeClock([0.0, 8.0, 9.0]))
    logger.exclude(100.0)  # before the first update: no interval yet, nothing to leave out
    logger.update(10, {})
    logger.exclude(6.0)
    logger.update(20, {})
    logger.update(30, {})  # the exclusion applied to one interval only: 10 steps in 1 s
    lines = stream.getvalue().splitlines()
    assert "5.00 steps/s | 20.0 img/s" in lines[1], lines
    assert "10.00 steps/s | 40.0 img/s" in lines[2], lines


def test_progress_first_call_on_a_print_step_has_no_rate_and_last_step_prints():
    stream = io.StringIO()
    logger = ProgressLogger(7300, batch_size=128, every_steps=100, stream=stream, clock=_FakeClock([10.0, 3610.0]))
    logger.update(100, {"loss": 1.0})
    logger.update(7300, {"loss": 0.125})  # last step, printed though not a multiple
    lines = stream.getvalue().splitlines()
    assert lines[0] == "step 100/7300 (1.4%) | loss 1 | - steps/s | - img/s | ETA -"
    assert lines[1] == "step 7300/7300 (100.0%) | loss 0.125 | 2.00 steps/s | 256.0 img/s | ETA 0:00:00"


def test_progress_on_a_terminal_rewrites_one_line():
    stream = _Tty()
    logger = ProgressLogger(
        20, batch_size=1, every_steps=10, stream=stream, clock=_FakeClock([0.0, 3600.0 + 61.0, 7322.0])
    )
    logger.update(0, {"loss": 1.0})
    logger.update(10, {"loss": 1.0})
    out = stream.getvalue()
    assert "\n" not in out and out.count("\r") == 2
    assert out.split("\r")[-1].startswith("[" + "#" * 15 + "-" * 15 + "] step 10/20")
    assert "ETA 1:01:01" in out  # 10 steps in 3661 s; 10 left
    logger.update(20, {"loss": 0.5})
    assert stream.getvalue().endswith("\n")
    assert stream.getvalue().split("\r")[-1].startswith("[" + "#" * 30 + "]")


def test_progress_disabled_prints_nothing_and_bad_args_raise():
    stream = io.StringIO()
    logger = ProgressLogger(10, batch_size=2, every_steps=1, enabled=False, stream=stream)
    logger.update(1, {"loss": 1.0})
    assert stream.getvalue() == ""
    for kwargs in ({"batch_size": 0, "every_steps": 1}, {"batch_size": 1, "every_steps": 0}):
        with pytest.raises(ValueError):
            ProgressLogger(10, **kwargs)
    with pytest.raises(ValueError, match="num_train_steps"):
        ProgressLogger(0, batch_size=1, every_steps=1)


# ---------------------------------------------------------------- grids & PNG


def test_image_grid_by_hand():
    # Two 2x2 grey images; x -> round((x + 1) * 127.5), clipped.
    a = np.array([[-1.0, 1.0], [0.0, 0.5]])  # -> 0, 255, 128 (127.5 rounds to even), 191 (191.25)
    b = np.array([[-1.2, 2.0], [-0.996, 0.999]])  # -> 0 (clip), 255 (clip), 1 (0.51), 255 (254.87)
    images = np.stack([a, b])[..., None]
    grid = image_grid(images, ncols=2, padding=1)
    expected = np.zeros((4, 7), np.uint8)  # 1 px of 0 around and between
    expected[1:3, 1:3] = [[0, 255], [128, 191]]
    expected[1:3, 4:6] = [[0, 255], [1, 255]]
    assert grid.dtype == np.uint8 and grid.shape == (4, 7, 1)
    np.testing.assert_array_equal(grid[..., 0], expected)


def test_image_grid_layout_default_columns_and_empty_cells():
    # Five constant RGB images: default ncols = ceil(sqrt(5)) = 3, rows = 2.
    values = np.linspace(-1, 1, 5)
    images = np.broadcast_to(values[:, None, None, None], (5, 3, 2, 3)).astype(np.float32)
    grid = image_grid(images, padding=2)
    assert grid.shape == (2 * (3 + 2) + 2, 3 * (2 + 2) + 2, 3)
    for i, v in enumerate(values):
        r, c = divmod(i, 3)
        cell = grid[2 + r * 5 : 2 + r * 5 + 3, 2 + c * 4 : 2 + c * 4 + 2]
        assert np.all(cell == np.uint8(round((v + 1) * 127.5)))
    assert np.all(grid[7:10, 10:12] == 0)  # the sixth cell is empty
    no_pad = image_grid(images[:4], padding=0)
    assert no_pad.shape == (6, 4, 3)


def test_image_grid_takes_bfloat16_images_and_numpy_column_counts():
    import jax.numpy as jnp

    values = np.array([-1.0, -0.5, 0.0, 0.5, 1.0])  # exact in bfloat16
    images = np.broadcast_to(values[:, None, None, None], (5, 1, 1, 1))
    grid = image_grid(jnp.asarray(images, jnp.bfloat16), ncols=np.int64(5), padding=0)
    np.testing.assert_array_equal(grid[0, :, 0], [0, 64, 128, 191, 255])  # round((v + 1) * 127.5), ties to even


def test_image_grid_rejects_bad_input():
    with pytest.raises(ValueError, match=r"\[N, H, W, C\]"):
        image_grid(np.zeros((2, 2, 3)))
    with pytest.raises(TypeError, match="floats"):
        image_grid(np.zeros((1, 2, 2, 3), np.uint8))
    with pytest.raises(ValueError, match="NaN"):
        image_grid(np.full((1, 2, 2, 3), np.nan))
    with pytest.raises(ValueError, match="ncols"):
        image_grid(np.zeros((1, 2, 2, 3)), ncols=0)
    with pytest.raises(ValueError, match="padding"):
        image_grid(np.zeros((1, 2, 2, 3)), padding=-1)


@pytest.mark.parametrize("channels", [1, 3, 4])
def test_save_png_round_trip(tmp_path, channels):
    grid = np.random.default_rng(channels).integers(0, 256, (5, 7, channels), dtype=np.uint8)
    path = tmp_path / "sub" / "grid.png"
    save_png(path, grid)
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.mode == {1: "L", 3: "RGB", 4: "RGBA"}[channels]
        loaded = np.asarray(image)
    np.testing.assert_array_equal(loaded.reshape(grid.shape), grid)


def test_save_png_rejects_bad_input(tmp_path):
    with pytest.raises(TypeError, match="uint8"):
        save_png(tmp_path / "x.png", np.zeros((2, 2, 3), np.float32))
    with pytest.raises(ValueError, match="C in"):
        save_png(tmp_path / "x.png", np.zeros((2, 2, 2), np.uint8))
