"""image_io: the folder walker, loader (EXIF, ICC, damaged files), RGB conversion, atomic writer and saver."""

import logging
import os
import stat
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image, ImageCms

from diffusers_restore import image_io
from diffusers_restore.image_io import (
    ImageReadError,
    atomic_write,
    atomic_write_json,
    find_images,
    high_bit_to_unit,
    image_size,
    load_image,
    load_rgb,
    read_json,
    save_image,
    to_rgb,
)

SRGB_PROFILE = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
GRAY_PROFILE = SRGB_PROFILE[:16] + b"GRAY" + SRGB_PROFILE[20:]  # only the header's colour space matters here


def _pixels(image):
    return sorted(set(image.getdata()))


def _rotated_jpeg(path, orientation=6, size=(40, 20)):
    image = Image.new("RGB", size, (255, 0, 0))
    exif = image.getexif()
    exif[0x0112] = orientation
    image.save(path, exif=exif)
    return str(path)


def test_import_without_torch():
    code = "import sys, diffusers_restore.image_io; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


# ------------------------------------------------------------------------------------------- find_images


def test_find_images_recursive_sorted_filtered_and_excluding(tmp_path):
    files = ["b.png", "a.JPG", "sub/z.Tiff", "sub/deeper/c.webp", "sub2/x.jpeg", "out/made.png", "notes.txt",
             ".hidden.png", "._resource.jpg", ".tmp-a.png.x1y2", ".ipynb_checkpoints/a.png", "photo.png.bak"]
    for name in reversed(files):  # created in another order than the expected one
        os.makedirs(tmp_path / os.path.dirname(name), exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    found = find_images(tmp_path, exclude=[tmp_path / "out"])
    relative = [os.path.relpath(path, tmp_path).replace(os.sep, "/") for path in found]
    assert relative == ["a.JPG", "b.png", "sub/deeper/c.webp", "sub/z.Tiff", "sub2/x.jpeg"]
    assert all(path.startswith(str(tmp_path)) for path in found)
    assert len(find_images(tmp_path)) == 6  # out/ is listed when not excluded
    assert find_images(tmp_path / "sub2") == [os.path.join(str(tmp_path / "sub2"), "x.jpeg")]
    (tmp_path / "empty").mkdir()
    assert find_images(tmp_path / "empty") == []
    with pytest.raises(NotADirectoryError, match="b.png"):
        find_images(tmp_path / "b.png")


def test_find_images_skips_folders_this_package_wrote_below_the_root_but_reads_one_given_as_root(tmp_path, caplog):
    (tmp_path / "photo.png").write_bytes(b"")
    (tmp_path / "restored").mkdir()
    (tmp_path / "restored" / "photo.png").write_bytes(b"")
    image_io.mark_output_folder(tmp_path / "restored", "restore")
    with caplog.at_level(logging.WARNING, logger="diffusers_restore.image_io"):
        assert find_images(tmp_path) == [str(tmp_path / "photo.png")]
    assert f"skipping {tmp_path / 'restored'}: sana-restore wrote it" in caplog.text
    assert find_images(tmp_path / "restored") == [str(tmp_path / "restored" / "photo.png")]


@pytest.mark.skipif(not hasattr(os, "symlink"), reason="needs symbolic links")
def test_find_images_skips_a_broken_link_with_a_line(tmp_path, caplog):
    (tmp_path / "photo.png").write_bytes(b"")
    os.symlink(tmp_path / "gone.png", tmp_path / "link.png")
    with caplog.at_level(logging.WARNING, logger="diffusers_restore.image_io"):
        assert find_images(tmp_path) == [str(tmp_path / "photo.png")]
    assert f"skipping {tmp_path / 'link.png'}: a broken symbolic link" in caplog.text


def _frames(count):
    return [Image.new("RGB", (16, 12), (40 * index, 80, 120)) for index in range(count)]


@pytest.mark.parametrize("name", ["animated.gif", "pages.tiff", "animated.png", "animated.webp"])
def test_multi_frame_files_are_refused_by_every_reader_never_cut_to_frame_one(tmp_path, name):
    first, *others = _frames(3)
    first.save(tmp_path / name, save_all=True, append_images=others)
    assert find_images(tmp_path) == [str(tmp_path / name)]  # found, so the refusal is said, not silent
    for read in (load_image, load_rgb, image_size):
        with pytest.raises(ImageReadError, match=r"holds 3 frames \(an animated or multi-page"):
            read(tmp_path / name)


def test_single_frame_gif_and_camera_mpo_are_read(tmp_path):
    first, second = _frames(2)
    first.save(tmp_path / "still.gif")
    assert find_images(tmp_path) == [str(tmp_path / "still.gif")]
    assert load_rgb(tmp_path / "still.gif").size == (16, 12)
    first.save(tmp_path / "camera.jpg", format="MPO", save_all=True, append_images=[second])
    with Image.open(tmp_path / "camera.jpg") as image:
        assert image.format == "MPO" and image.n_frames == 2
    assert np.abs(np.asarray(load_rgb(tmp_path / "camera.jpg"), float) - np.asarray(first, float)).mean() < 3


# ----------------------------------------------------------------------------------------------- writing


def test_atomic_write_replaces_creates_folders_and_leaves_nothing_behind(tmp_path):
    target = tmp_path / "new" / "folder" / "file.bin"
    atomic_write(target, b"first")
    atomic_write(target, b"second")
    assert target.read_bytes() == b"second"
    assert os.listdir(target.parent) == ["file.bin"]
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o666 & ~umask  # not the 0o600 of a temporary file
    with pytest.raises(TypeError):
        atomic_write(target, "not bytes")  # fails while writing
    assert target.read_bytes() == b"second" and os.listdir(target.parent) == ["file.bin"]


def test_json_round_trip_and_damaged_json_names_the_file(tmp_path):
    path = tmp_path / "settings.json"
    atomic_write_json(path, {"b": 1, "a": [1, 2]})
    assert read_json(path) == {"a": [1, 2], "b": 1}
    path.write_text('{"a": ')
    with pytest.raises(ValueError, match=r"settings\.json is not valid JSON .*line 1 column 7.*Delete it"):
        read_json(path, "Delete it.")
    path.write_bytes(b"")
    with pytest.raises(ValueError, match="settings.json is not valid JSON .it is empty"):
        read_json(path)
    path.write_bytes(b'{"a": "\xe9"}')
    with pytest.raises(ValueError, match="settings.json is not UTF-8"):
        read_json(path)


def test_remove_stray_temp_files(tmp_path):
    (tmp_path / "sub").mkdir()
    for name in (".tmp-a.png.123", "sub/.tmp-b.png.456", "keep.png"):
        (tmp_path / name).write_bytes(b"x")
    assert image_io.remove_stray_temp_files(tmp_path) == [str(tmp_path / ".tmp-a.png.123")]
    assert image_io.remove_stray_temp_files(tmp_path, recursive=True) == [str(tmp_path / "sub" / ".tmp-b.png.456")]
    assert sorted(os.listdir(tmp_path)) == ["keep.png", "sub"] and os.listdir(tmp_path / "sub") == []


# ----------------------------------------------------------------------------------------------- loading


def test_load_image_applies_and_drops_exif_orientation(tmp_path):
    path = _rotated_jpeg(tmp_path / "rotated.jpg")
    loaded = load_image(path)
    assert loaded.size == (20, 40) and loaded.mode == "RGB"
    assert loaded.getexif().get(0x0112) is None  # nothing downstream rotates it a second time
    assert load_image(path, exif_transpose=False).size == (40, 20)
    assert image_size(path) == (20, 40) and image_size(path, exif_transpose=False) == (40, 20)
    assert image_size(_rotated_jpeg(tmp_path / "upright.jpg", orientation=3)) == (40, 20)  # 180 degrees
    png = Image.new("RGB", (40, 20))
    exif = png.getexif()
    exif[0x0112] = 8
    png.save(tmp_path / "rotated.png", exif=exif)
    assert image_size(tmp_path / "rotated.png") == load_image(tmp_path / "rotated.png").size == (20, 40)


def test_load_image_keeps_mode_and_icc_profile(tmp_path):
    Image.new("RGB", (8, 8), (1, 2, 3)).save(tmp_path / "profiled.png", icc_profile=SRGB_PROFILE)
    Image.new("RGB", (8, 8), (1, 2, 3)).save(tmp_path / "profiled.jpg", icc_profile=SRGB_PROFILE)
    for name in ("profiled.png", "profiled.jpg"):
        assert load_image(tmp_path / name).info["icc_profile"] == SRGB_PROFILE
    deep = np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000
    Image.fromarray(deep).save(tmp_path / "deep.png")
    loaded = load_image(tmp_path / "deep.png")
    assert loaded.mode.startswith("I") and np.array_equal(np.asarray(loaded), deep)  # no conversion


def test_load_image_errors_name_the_file(tmp_path):
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "full.png")
    for cut in (20, 60, 6000):
        truncated = tmp_path / f"truncated{cut}.png"
        truncated.write_bytes((tmp_path / "full.png").read_bytes()[:cut])
        with pytest.raises(ImageReadError, match=f"truncated{cut}.png: image file is truncated") as info:
            load_image(truncated)
        assert info.value.path == str(truncated) and isinstance(info.value, OSError)
    (tmp_path / "text.jpg").write_text("not an image")
    with pytest.raises(ImageReadError, match="text.jpg: cannot identify image file"):
        load_image(tmp_path / "text.jpg")
    with pytest.raises(ImageReadError, match="text.jpg: cannot identify image file"):
        image_size(tmp_path / "text.jpg")
    with pytest.raises(FileNotFoundError, match="missing.png"):
        load_image(tmp_path / "missing.png")


def test_to_rgb_conversions():
    rgba = Image.new("RGBA", (4, 4), (10, 20, 30, 0))
    assert _pixels(to_rgb(rgba)) == [(255, 255, 255)]  # transparent -> white background
    assert _pixels(to_rgb(rgba, background=(0, 0, 0))) == [(0, 0, 0)]
    assert _pixels(to_rgb(Image.new("RGBA", (4, 4), (10, 20, 30, 255)))) == [(10, 20, 30)]
    assert _pixels(to_rgb(Image.fromarray(np.full((4, 4), 65535, np.uint16)))) == [(255, 255, 255)]
    assert _pixels(to_rgb(Image.fromarray(np.full((4, 4), 0.5, np.float32)))) == [(128, 128, 128)]
    palette = Image.new("P", (4, 4), 1)
    palette.putpalette([0, 0, 0, 9, 8, 7] + [0] * 762)
    palette.info["transparency"] = 0
    assert _pixels(to_rgb(palette)) == [(9, 8, 7)]
    assert to_rgb(Image.new("L", (4, 4), 7)).mode == "RGB"
    rgb = Image.new("RGB", (4, 4))
    assert to_rgb(rgb) is rgb
    with pytest.raises(TypeError, match="PIL.Image.Image"):
        to_rgb(np.zeros((4, 4, 3)))


@pytest.mark.parametrize(
    "values, dtype, expected_scale",
    [
        ([0, 128, 255], np.uint16, 65535),  # I;16: always 16-bit
        ([0, 128, 255], np.int32, 255),  # I within 0-255: 8-bit data in a 32-bit image
        ([0, 256, 65535], np.int32, 65535),  # I above 255: 16-bit
        ([0.0, 0.25, 1.0], np.float32, 1),  # F within [0, 1]: taken as it is
        ([0.0, 128.0, 255.0], np.float32, 255),
        ([0.0, 300.0, 65535.0], np.float32, 65535),
    ],
)
def test_high_bit_modes_follow_one_rule(values, dtype, expected_scale):
    image = Image.fromarray(np.array([values], dtype=dtype))
    expected = np.array([values], dtype=np.float64) / expected_scale
    np.testing.assert_allclose(high_bit_to_unit(image), expected, rtol=1e-6)
    # the 8-bit RGB conversion of the file readers follows the same rule
    np.testing.assert_array_equal(np.asarray(to_rgb(image))[..., 0], np.rint(expected * 255).astype(np.uint8))


@pytest.mark.parametrize(
    "values, dtype", [([-1.0, 0.5], np.float32), ([0.0, float("nan")], np.float32), ([-3, 7], np.int32),
                      ([0, 70000], np.int32)]
)
def test_high_bit_values_no_range_holds_are_refused(values, dtype):
    image = Image.fromarray(np.array([values], dtype=dtype))
    with pytest.raises(ValueError, match=f"mode {image.mode} image has values in"):
        high_bit_to_unit(image)
    with pytest.raises(ValueError, match=f"mode {image.mode} image"):
        to_rgb(image)


def test_to_rgb_keeps_rgb_profiles_only():
    rgba = Image.new("RGBA", (4, 4), (10, 20, 30, 255))
    rgba.info["icc_profile"] = SRGB_PROFILE
    assert to_rgb(rgba).info["icc_profile"] == SRGB_PROFILE
    grey = Image.new("L", (4, 4), 7)
    grey.info["icc_profile"] = GRAY_PROFILE
    assert "icc_profile" not in to_rgb(grey).info  # a grey profile would mislabel RGB pixels


def test_load_rgb(tmp_path):
    loaded = load_rgb(_rotated_jpeg(tmp_path / "rotated.jpg"))
    assert loaded.size == (20, 40) and loaded.mode == "RGB"
    Image.new("LA", (8, 8), (10, 0)).save(tmp_path / "transparent.png")
    assert _pixels(load_rgb(tmp_path / "transparent.png")) == [(255, 255, 255)]


# ------------------------------------------------------------------------------------------------ saving


@pytest.mark.parametrize("name", ["out.png", "out.JPG", "out.jpeg", "out.webp", "out.tif", "out.TIFF"])
def test_save_image_embeds_the_icc_profile(tmp_path, name):
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (16, 24, 3), dtype=np.uint8))
    save_image(image, tmp_path / name, icc_profile=SRGB_PROFILE)
    with Image.open(tmp_path / name) as written:
        expected_format = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP", ".tif": "TIFF",
                           ".tiff": "TIFF"}[os.path.splitext(name)[1].lower()]
        assert written.format == expected_format and written.size == (24, 16)
        assert written.info["icc_profile"] == SRGB_PROFILE
    assert os.listdir(tmp_path) == [name]


def test_save_image_round_trip_and_profile_defaults(tmp_path):
    image = Image.fromarray(np.random.default_rng(1).integers(0, 255, (16, 24, 3), dtype=np.uint8))
    save_image(image, tmp_path / "plain.png")
    assert np.array_equal(np.asarray(load_image(tmp_path / "plain.png")), np.asarray(image))  # lossless, exact
    assert "icc_profile" not in load_image(tmp_path / "plain.png").info
    image.info["icc_profile"] = SRGB_PROFILE
    save_image(image, tmp_path / "own.png")  # the image's own profile by default
    assert load_image(tmp_path / "own.png").info["icc_profile"] == SRGB_PROFILE


def test_save_image_leaves_out_profiles_it_cannot_embed(tmp_path, caplog):
    image = Image.new("RGB", (8, 8), (1, 2, 3))
    with caplog.at_level(logging.WARNING, logger="diffusers_restore.image_io"):
        save_image(image, tmp_path / "out.bmp", icc_profile=SRGB_PROFILE)
        save_image(image, tmp_path / "grey.png", icc_profile=GRAY_PROFILE)
    assert "cannot hold an ICC profile" in caplog.text and "describes GRAY data" in caplog.text
    assert "icc_profile" not in load_image(tmp_path / "grey.png").info
    assert load_image(tmp_path / "out.bmp").size == (8, 8)


def test_save_image_errors_leave_existing_files_alone(tmp_path):
    source = tmp_path / "input.png"
    Image.new("RGB", (8, 8), (1, 2, 3)).save(source)
    original = source.read_bytes()
    with pytest.raises(FileExistsError, match="input.png"):
        save_image(Image.new("RGB", (8, 8)), tmp_path / "." / "input.png", protected_paths=[source])
    os.link(source, tmp_path / "hardlink.png")
    with pytest.raises(FileExistsError, match="hardlink.png"):
        save_image(Image.new("RGB", (8, 8)), tmp_path / "hardlink.png", protected_paths=[source])
    with pytest.raises(ValueError, match=r"cannot write '.*input.jpg' as JPEG"):
        save_image(Image.new("RGBA", (8, 8)), tmp_path / "input.jpg")
    with pytest.raises(ValueError, match="cannot tell the image format of .*out.xyz"):
        save_image(Image.new("RGB", (8, 8)), tmp_path / "out.xyz")
    assert source.read_bytes() == original
    assert sorted(os.listdir(tmp_path)) == ["hardlink.png", "input.png"]  # no temporary files, no partial output


def test_save_image_writes_atomically(tmp_path, monkeypatch):
    target = tmp_path / "out.png"
    save_image(Image.new("RGB", (8, 8), (1, 2, 3)), target)
    before = target.read_bytes()

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(image_io.os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        save_image(Image.new("RGB", (8, 8), (9, 9, 9)), target)
    assert target.read_bytes() == before and os.listdir(tmp_path) == ["out.png"]
