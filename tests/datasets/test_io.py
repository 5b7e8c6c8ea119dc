from __future__ import annotations


def test_dataset_file_error_survives_pickling_from_loader_workers():
    import pickle

    from densehybrid.data.datasets._io import DatasetFileError

    err = DatasetFileError("/data/x.png", "Expected label '/data/x.png' to exist, but it is missing.", "Re-download.")
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is DatasetFileError
    assert (back.path, back.problem, back.fix, str(back)) == (err.path, err.problem, err.fix, str(err))


def test_read_rgb_scales_16_bit_greyscale_instead_of_clipping(tmp_path):
    import numpy as np
    from PIL import Image

    from densehybrid.data.datasets._io import read_rgb

    values = np.array([[0, 257 * 100], [65535, 257 * 37]], dtype=np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(values).save(path)
    rgb = read_rgb(path)
    assert rgb.shape == (2, 2, 3) and rgb.dtype == np.uint8
    np.testing.assert_array_equal(rgb[..., 0], [[0, 100], [255, 37]])
    assert (rgb[..., 0] == rgb[..., 2]).all()


def test_read_rgb_applies_exif_orientation_and_drops_alpha(tmp_path):
    import numpy as np
    from PIL import Image

    from densehybrid.data.datasets._io import read_rgb

    pixels = np.zeros((16, 24, 3), dtype=np.uint8)
    pixels[:8, :8] = (255, 0, 0)
    image = Image.fromarray(pixels)
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when displayed
    path = tmp_path / "rotated.jpg"
    image.save(path, exif=exif, quality=100)
    rotated = read_rgb(path)
    assert rotated.shape == (24, 16, 3)
    assert rotated[2, 13, 0] > 200 and rotated[2, 13, 1] < 60  # the red corner moved to the top right

    rgba = np.zeros((2, 2, 4), dtype=np.uint8)
    rgba[..., 1] = 200
    rgba[..., 3] = 0  # fully transparent: the colour is kept, the alpha dropped
    Image.fromarray(rgba, "RGBA").save(tmp_path / "alpha.png")
    np.testing.assert_array_equal(read_rgb(tmp_path / "alpha.png")[..., 1], 200)


def test_read_rgb_converts_palette_and_float_images(tmp_path):
    import numpy as np
    from PIL import Image

    from densehybrid.data.datasets._io import image_to_rgb

    palette = Image.new("P", (2, 1))
    palette.putpalette([10, 20, 30, 40, 50, 60] + [0] * 762)
    palette.putpixel((1, 0), 1)
    np.testing.assert_array_equal(image_to_rgb(palette)[0], [[10, 20, 30], [40, 50, 60]])
    floats = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32), "F")
    np.testing.assert_array_equal(image_to_rgb(floats)[0, :, 0], [0, 128, 255])
