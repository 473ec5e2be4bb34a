"""Images are decoded as viewers show them, or refused with a MediaError naming the file."""

import io

import numpy as np
import pytest
from PIL import Image

from mmalign.media import MediaError, open_image


def png_bytes(im: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=kw.pop("format", "PNG"), **kw)
    return buf.getvalue()


def test_16_bit_greyscale_is_scaled_not_clipped_to_white():
    ramp = np.linspace(0, 65535, 32 * 32).reshape(32, 32).astype(np.uint16)
    out = np.asarray(open_image(png_bytes(Image.fromarray(ramp)), "ramp16.png"))
    assert out.shape == (32, 32, 3)
    np.testing.assert_array_equal(out[..., 0], np.rint(ramp / 257.0).astype(np.uint8))
    assert 120 < out.mean() < 135


def test_exif_orientation_is_applied():
    im = Image.new("RGB", (40, 20), (255, 0, 0))
    im.paste((0, 0, 255), (0, 0, 20, 20))  # left half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise for display
    out = open_image(png_bytes(im, format="JPEG", exif=exif, quality=95), "rotated.jpg")
    assert out.size == (20, 40)
    top = np.asarray(out)[:10].mean(axis=(0, 1))
    assert top[2] > 200 and top[0] < 60  # the blue half is on top after the rotation


def test_transparency_is_composited_over_white():
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    rgba.paste((255, 0, 0, 255), (0, 0, 4, 8))
    out = np.asarray(open_image(png_bytes(rgba), "alpha.png"))
    assert (out[:, :4] == [255, 0, 0]).all() and (out[:, 4:] == 255).all()


def test_palette_and_cmyk_use_pillows_conversion():
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 255, (8, 8, 3), dtype=np.uint8))
    pal = rgb.quantize(16)
    np.testing.assert_array_equal(np.asarray(open_image(png_bytes(pal), "p.png")), np.asarray(pal.convert("RGB")))
    cmyk = rgb.convert("CMYK")
    got = np.asarray(open_image(png_bytes(cmyk, format="TIFF"), "c.tif"))
    np.testing.assert_array_equal(got, np.asarray(cmyk.convert("RGB")))


def test_decompression_bomb_is_a_media_error(monkeypatch):
    data = png_bytes(Image.new("RGB", (64, 64)))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 64 * 64 // 4)  # more than twice the limit: a bomb
    with pytest.raises(MediaError, match="bomb.png: refused as a decompression bomb"):
        open_image(data, "bomb.png")


def test_float_image_is_refused_by_name():
    with pytest.raises(MediaError, match="f.tif: floating-point image"):
        open_image(png_bytes(Image.new("F", (4, 4)), format="TIFF"), "f.tif")
