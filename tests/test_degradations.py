"""Degradations (PIL/numpy): determinism, direction of each effect, modes, specs, prompts, Real-ESRGAN, severity."""

import math
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from diffusers_restore.data import degradation_ops, realesrgan
from diffusers_restore.data import degradations as D
from diffusers_restore.image_io import to_rgb


def _photo(size=96):
    """A real photo (skimage's astronaut), resized to `size` square."""
    skimage_data = pytest.importorskip("skimage.data")
    return Image.fromarray(skimage_data.astronaut()).resize((size, size), Image.Resampling.BOX)


def _array(image):
    return np.asarray(image, dtype=np.float64)


def _psnr(a, b):
    mse = np.mean((_array(a) - _array(b)) ** 2)
    return 10 * math.log10(255.0**2 / mse)


def _high_frequency_energy(image):
    x = _array(image.convert("L"))
    laplacian = 4 * x[1:-1, 1:-1] - x[:-2, 1:-1] - x[2:, 1:-1] - x[1:-1, :-2] - x[1:-1, 2:]
    return float(np.mean(laplacian**2))


def test_degradations_import_without_torch():
    code = (
        "import sys, diffusers_restore.data, diffusers_restore.data.degradations as d;"
        "d.random_degradation(d.Image.new('RGB', (16, 16)), rng=0);"
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("name", list(D.DEGRADATIONS))
def test_each_degradation_is_deterministic_and_reports_its_parameters(name):
    image = _photo(64)
    out1, record1 = D.DEGRADATIONS[name](image, rng=np.random.default_rng(3))
    out2, record2 = D.DEGRADATIONS[name](image, rng=3)  # an int seed is the same generator
    out3, record3 = D.DEGRADATIONS[name](image, rng=4)
    assert out1.tobytes() == out2.tobytes() and record1 == record2
    assert record1["name"] == name and record1["params"]
    assert record1 != record3 or out1.tobytes() != out3.tobytes()
    assert out1.size == image.size and out1.mode == image.mode


@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA", "LA", "P", "I;16", "F", "CMYK"])
@pytest.mark.parametrize("name", list(D.DEGRADATIONS) + ["realesrgan"])
def test_l_stays_l_and_other_modes_are_degraded_as_their_rgb(mode, name):
    base = _photo(48)
    if mode == "I;16":
        image = Image.fromarray((_array(base.convert("L")) * 257).astype(np.uint16))
    elif mode == "F":  # 16-bit levels in a float image: the package's one rule reads them as 16-bit
        image = Image.fromarray((_array(base.convert("L")) * 257).astype(np.float32))
    elif mode in ("RGBA", "LA"):
        image = base.convert(mode)
        image.putalpha(Image.linear_gradient("L").resize(base.size))
    else:
        image = base.convert(mode)

    def degrade(picture):
        if name == "realesrgan":
            return D.realesrgan_degradation(picture, rng=0)
        return D.DEGRADATIONS[name](picture, rng=0)

    out, record = degrade(image)
    assert out.size == image.size and out.mode == ("L" if mode == "L" else "RGB")
    if mode not in ("RGB", "L"):  # exactly what degrading the package's one RGB conversion gives
        expected, expected_record = degrade(to_rgb(image))
        assert out.tobytes() == expected.tobytes() and record == expected_record
    if mode in ("I;16", "F"):  # the same grey levels as the 8-bit image
        assert out.tobytes() == degrade(base.convert("L").convert("RGB"))[0].tobytes()


@pytest.mark.parametrize(
    "spec, message",
    [
        ("gaussian_noise:inf", r"gaussian_noise: sigma must be a number in \[0, 100\], got inf"),
        ("gaussian_noise:1e9", r"sigma must be a number in \[0, 100\], got 1000000000.0"),
        ("gaussian_noise:nan", r"sigma must be a number in \[0, 100\], got nan"),
        ("poisson_noise:50", r"poisson_noise: scale must be a number in \[0, 10\]"),
        ("jpeg:101", r"jpeg: quality must be a number in \[1, 100\]"),
        ("gaussian_blur:99", r"gaussian_blur: kernel_size must be a number in \[1, 51\]"),
        ("gaussian_blur:7,sigma=100", r"gaussian_blur: sigma must be a number in \[0, 20\]"),
        ("downscale:1000", r"downscale: factor must be a number in \[1, 16\]"),
        ("colour_jitter:5,5", r"colour_jitter: brightness must be a number in \[-0.9, 1\]"),
        ("colour_jitter:0,-1", r"colour_jitter: contrast must be a number in \[-0.9, 1\]"),
        ("random:7", r"num_degradations must lie in \[1, 6\]"),
        ("realesrgan:100", r"realesrgan: scale must be an integer in \[1, 8\]"),
        ("gaussian_noise:25|downscale:1000", r"downscale: factor must be a number in \[1, 16\]"),
    ],
)
def test_every_spec_parameter_outside_its_documented_range_is_refused_with_the_range(spec, message):
    with pytest.raises(ValueError, match=message):
        D.parse_degradation_spec(spec)


def test_parameter_ranges_are_documented_and_their_ends_accepted():
    docs = degradation_ops.__doc__
    for name, parameters in degradation_ops.PARAMETER_RANGES.items():
        for key, (low, high) in parameters.items():
            assert f"| {name}" in docs and f"[{low:g}, {high:g}]" in docs, (name, key)
            for value in (low, high):
                if key == "kernel_size" and value % 2 == 0:
                    continue
                D.parse_degradation_spec(f"{name}:{key}={value}")


def test_gaussian_noise_has_the_requested_sigma():
    image = Image.new("RGB", (256, 256), (128, 128, 128))
    noisy5 = _array(D.gaussian_noise(image, sigma=5, rng=0)[0]) - 128
    noisy20 = _array(D.gaussian_noise(image, sigma=20, rng=0)[0]) - 128
    assert abs(noisy5.mean()) < 0.1 and abs(noisy20.mean()) < 0.2
    assert noisy5.std() == pytest.approx(5.0 * math.sqrt(1 + 1 / (12 * 25)), rel=0.02)  # + rounding variance
    assert noisy20.std() == pytest.approx(20.0, rel=0.02)
    # independent per channel by default, identical across channels with gray=True
    assert not np.array_equal(noisy20[..., 0], noisy20[..., 1])
    gray = _array(D.gaussian_noise(image, sigma=20, rng=0, gray=True)[0])
    assert np.array_equal(gray[..., 0], gray[..., 1])


def test_normal_quantile_table_is_a_standard_normal():
    z = degradation_ops.normal_quantiles().astype(np.float64)
    assert z.shape == (65536,) and np.all(np.diff(z) > 0)
    assert abs(z.mean()) < 1e-6 and z.std() == pytest.approx(1.0, abs=2e-3)


def test_poisson_table_matches_poisson_moments():
    levels = 256
    table = degradation_ops.poisson_noise_table(levels).astype(np.float64)
    for value in (10, 100, 200):
        lam = value / 255 * levels
        counts = (table[value] + value / 255) * levels  # back to Poisson counts
        assert np.allclose(counts, np.round(counts), atol=1e-3)
        assert counts.mean() == pytest.approx(lam, rel=0.01)
        assert counts.var() == pytest.approx(lam, rel=0.03)


def test_poisson_noise_grows_with_scale_and_brightness():
    ramp = np.tile(np.arange(256, dtype=np.uint8), (256, 1))
    image = Image.fromarray(np.stack([ramp] * 3, axis=-1))
    differences = {}
    for scale in (1.0, 3.0):
        out, record = D.poisson_noise(image, scale=scale, rng=0)
        assert record["params"]["scale"] == scale
        differences[scale] = _array(out) - _array(image)
    # Real-ESRGAN: 256 levels -> std = scale * sqrt(x * 256) / 256 * 255 at x = 0.5 (away from clipping)
    middle = differences[1.0][:, 120:136]
    assert middle.std() == pytest.approx(math.sqrt(128) / 256 * 255, rel=0.1)
    assert differences[3.0][:, 120:136].std() == pytest.approx(3 * middle.std(), rel=0.1)
    assert differences[1.0][:, 200:220].std() > differences[1.0][:, 20:40].std()  # shot noise grows with signal


def test_jpeg_quality_10_loses_more_than_quality_40():
    image = _photo(128)
    psnr10 = _psnr(image, D.jpeg(image, quality=10)[0])
    psnr40 = _psnr(image, D.jpeg(image, quality=40)[0])
    assert psnr10 < psnr40 < 60
    with pytest.raises(ValueError, match="quality"):
        D.jpeg(image, quality=0)


def test_blur_and_downscale_lower_high_frequencies():
    image = _photo(128)
    energy = _high_frequency_energy(image)
    blur3 = _high_frequency_energy(D.gaussian_blur(image, kernel_size=3)[0])
    blur11 = _high_frequency_energy(D.gaussian_blur(image, kernel_size=11)[0])
    down2 = _high_frequency_energy(D.downscale(image, factor=2)[0])
    down4 = _high_frequency_energy(D.downscale(image, factor=4)[0])
    assert blur11 < blur3 < energy
    assert down4 < down2 < energy
    # low frequencies survive: the mean colour barely moves
    assert abs(_array(D.gaussian_blur(image, kernel_size=11)[0]).mean() - _array(image).mean()) < 1.0
    with pytest.raises(ValueError, match="kernel_size"):
        D.gaussian_blur(image, kernel_size=4)


def test_colour_jitter_follows_its_formula():
    image = _photo(64)
    brighter, record = D.colour_jitter(image, brightness=0.2, contrast=0.0)
    assert record["params"] == {"brightness": 0.2, "contrast": 0.0}
    assert _array(brighter).mean() > _array(image).mean()
    flatter, _ = D.colour_jitter(image, brightness=0.0, contrast=-0.2)
    assert _array(flatter).std() == pytest.approx(0.8 * _array(image).std(), rel=0.02)
    # exact per-value map: x -> mean + (x * 1.1 - mean) * 0.9 (clipped, rounded), mean = average luma after step 1
    out, _ = D.colour_jitter(image, brightness=0.1, contrast=-0.1)
    bright = np.clip(np.rint(_array(image) * 1.1), 0, 255)
    mean = _array(Image.fromarray(bright.astype(np.uint8)).convert("L")).mean()
    expected = np.clip(np.rint(mean + (bright - mean) * 0.9), 0, 255)
    assert np.abs(_array(out) - expected).max() <= 1


def test_random_degradation_applies_distinct_degradations_in_random_order():
    image = _photo(48)
    counts, orders = set(), set()
    for seed in range(40):
        out, records = D.random_degradation(image, rng=seed)
        names = [r["name"] for r in records]
        assert 1 <= len(names) <= 3 and len(set(names)) == len(names)
        assert set(names) <= set(D.DEGRADATIONS)
        counts.add(len(names))
        orders.add(tuple(names))
        again, records_again = D.random_degradation(image, rng=seed)
        assert again.tobytes() == out.tobytes() and records_again == records
    assert counts == {1, 2, 3} and len(orders) > 20
    _, records = D.random_degradation(image, num_degradations=2, rng=0)
    assert len(records) == 2
    _, records = D.random_degradation(image, num_degradations=1, rng=0, names=["jpeg"])
    assert records[0]["name"] == "jpeg"
    with pytest.raises(ValueError, match="num_degradations"):
        D.random_degradation(image, num_degradations=7, rng=0)


def test_spec_parsing_and_application():
    spec = D.parse_degradation_spec("gaussian_noise:25")
    assert spec.name == "gaussian_noise" and spec.params == {"sigma": 25.0}
    assert D.parse_degradation_spec("jpeg:quality=20").params == {"quality": 20}
    assert D.parse_degradation_spec("color_jitter:0.1,-0.1").params == {"brightness": 0.1, "contrast": -0.1}
    assert D.parse_degradation_spec("realesrgan_light").name == "realesrgan_light"
    image = _photo(64)
    for text, name, key, value in [
        ("gaussian_noise:25", "gaussian_noise", "sigma", 25.0),
        ("jpeg:20", "jpeg", "quality", 20),
        ("downscale:2", "downscale", "factor", 2.0),
        ("gaussian_blur:7", "gaussian_blur", "kernel_size", 7),
    ]:
        out, records = D.apply_degradation_spec(image, text, np.random.default_rng(0))
        assert records == [records[0]] and records[0]["name"] == name and records[0]["params"][key] == value
        assert out.size == image.size
    _, records = D.apply_degradation_spec(image, "random:2", 0)
    assert len(records) == 2
    with pytest.raises(ValueError) as error:
        D.parse_degradation_spec("gausian_noise:25")
    for known in ("gaussian_noise", "jpeg", "downscale", "realesrgan"):
        assert known in str(error.value)
    for bad in ("jpeg:0", "jpeg:abc", "jpeg:20,3", "gaussian_noise:sigma=-1", "jpeg:foo=3", ""):
        with pytest.raises(ValueError):
            D.parse_degradation_spec(bad)


def test_alternatives_pick_each_option_with_its_own_parameters():
    spec = D.parse_degradation_spec("gaussian_noise:25 | jpeg:20|downscale")
    assert spec.name == D.ONE_OF and str(spec) == "gaussian_noise:sigma=25.0|jpeg:quality=20|downscale"
    assert str(D.parse_degradation_spec(str(spec))) == str(spec)  # the printed form parses back to itself
    image = _photo(64)
    rng = np.random.default_rng(0)
    seen = {}
    for _ in range(60):
        out, records = D.apply_degradation_spec(image, spec, rng)
        assert len(records) == 1 and out.size == image.size
        seen.setdefault(records[0]["name"], []).append(records[0]["params"])
    assert set(seen) == {"gaussian_noise", "jpeg", "downscale"}
    assert all(params["sigma"] == 25.0 for params in seen["gaussian_noise"])
    assert all(params["quality"] == 20 for params in seen["jpeg"])
    assert all(2 <= params["factor"] <= 4 for params in seen["downscale"])  # drawn from its range
    assert 10 <= len(seen["jpeg"]) <= 30  # uniform over three alternatives
    first = [D.apply_degradation_spec(image, spec, 7)[1] for _ in range(2)]
    assert first[0] == first[1]  # seeded
    for bad in ("jpeg:20|", "|jpeg", "jpeg||downscale", "jpeg:0|downscale"):
        with pytest.raises(ValueError):
            D.parse_degradation_spec(bad)


def test_get_degradation_fn_accepts_names_specs_and_callables():
    image = _photo(32)
    rng = np.random.default_rng(0)
    out, records = D.get_degradation_fn("jpeg:15")(image, rng)
    assert records[0]["params"]["quality"] == 15
    out, records = D.get_degradation_fn(lambda im, rng: im.rotate(180))(image, rng)
    assert out.tobytes() == image.rotate(180).tobytes() and len(records) == 1
    out, records = D.get_degradation_fn(lambda im, rng: (im, {"name": "jpeg", "params": {}}))(image, rng)
    assert records == [{"name": "jpeg", "params": {}}]
    with pytest.raises(TypeError):
        D.get_degradation_fn(3)


def test_degradation_prompt():
    rng = np.random.default_rng(0)
    assert D.degradation_prompt([], rng) == D.GENERIC_PROMPT
    assert D.degradation_prompt([{"name": "my_custom", "params": {}}], rng) == D.GENERIC_PROMPT
    for name in D.DEGRADATIONS:
        record = [{"name": name, "params": {}}]
        prompts = {D.degradation_prompt(record, seed, generic_probability=0) for seed in range(60)}
        assert len(prompts) >= 3 and D.GENERIC_PROMPT not in prompts  # several phrasings
    jpeg_prompts = {D.degradation_prompt({"name": "jpeg", "params": {}}, s, 0.0) for s in range(60)}
    assert "Remove JPEG compression artifacts, restore sharp details" in jpeg_prompts
    noise_prompts = {D.degradation_prompt({"name": "gaussian_noise", "params": {}}, s, 0.0) for s in range(60)}
    assert "Remove gaussian noise from this image" in noise_prompts
    records = [{"name": "gaussian_noise", "params": {}}, {"name": "jpeg", "params": {}}]
    combined = D.degradation_prompt(records, 1, generic_probability=0)
    assert "noise" in combined and ("JPEG" in combined or "compression" in combined)
    assert D.degradation_prompt(records, 5) == D.degradation_prompt(records, 5)
    share = np.mean([D.degradation_prompt(records, s) == D.GENERIC_PROMPT for s in range(400)])
    assert 0.05 < share < 0.16  # generic_probability 0.1 by default


def test_bessel_j1_and_sinc_kernel():
    assert realesrgan._bessel_j1(np.array([1.0]))[0] == pytest.approx(0.44005058574493355, abs=1e-12)
    assert realesrgan._bessel_j1(np.array([3.8317059702075125]))[0] == pytest.approx(0.0, abs=1e-12)  # first zero
    special = pytest.importorskip("scipy.special")
    x = np.linspace(0, 45, 500)
    assert np.allclose(realesrgan._bessel_j1(x), special.j1(x), atol=1e-12)
    kernel = D.circular_lowpass_kernel(np.pi / 2, 21)
    assert kernel.shape == (21, 21) and kernel.sum() == pytest.approx(1.0, abs=1e-5)
    assert np.allclose(kernel, kernel.T) and np.allclose(kernel, kernel[::-1, ::-1])
    # its spectrum is flat below the cut-off and small above it
    spectrum = np.abs(np.fft.fftshift(np.fft.fft2(kernel, s=(128, 128))))
    assert spectrum[64, 64 + 8] > 0.9 and spectrum[64, 64 + 48] < 0.15


def test_realesrgan_kernels():
    rng = np.random.default_rng(0)
    isotropic = realesrgan._anisotropic_kernel(21, 2.0, 2.0, 0.0, "gaussian")
    one_d = np.exp(-0.5 * (np.arange(-10, 11) / 2.0) ** 2)
    assert np.allclose(isotropic, np.outer(one_d, one_d) / np.outer(one_d, one_d).sum(), atol=1e-7)
    rotated = realesrgan._anisotropic_kernel(21, 3.0, 0.5, np.pi / 2, "gaussian")
    unrotated = realesrgan._anisotropic_kernel(21, 3.0, 0.5, 0.0, "gaussian")
    assert np.allclose(rotated, unrotated.T, atol=1e-6)
    config = D.REALESRGAN
    types = set()
    for _ in range(200):
        kernel, params = D.random_realesrgan_kernel(
            rng, config.kernel_sizes, config.kernel_types, config.kernel_probs, config.blur_sigma, config.betag_range,
            config.betap_range, config.sinc_prob,
        )
        types.add(params["type"])
        assert kernel.shape == (params["size"],) * 2 and params["size"] in config.kernel_sizes
        assert kernel.sum() == pytest.approx(1.0, abs=1e-5)
        assert np.allclose(kernel, kernel[::-1, ::-1], atol=1e-7)  # point-symmetric
    assert {"iso", "aniso", "sinc", "generalized_iso", "plateau_iso"} <= types


def test_fft_filter_equals_direct_correlation():
    rng = np.random.default_rng(0)
    values = rng.random((3, 23, 31), dtype=np.float32)
    kernel = rng.random((7, 7)).astype(np.float32)
    padded = np.pad(values, ((0, 0), (3, 3), (3, 3)), mode="reflect")
    direct = np.zeros_like(values)
    for dy in range(7):
        for dx in range(7):
            direct += kernel[dy, dx] * padded[:, dy : dy + 23, dx : dx + 31]
    assert np.allclose(realesrgan._filter2d(values, kernel), direct, atol=1e-5)


def test_realesrgan_presets():
    image = _photo(128)
    out, records = D.realesrgan_degradation(image, rng=0)
    again, records_again = D.realesrgan_degradation(image, rng=0)
    assert out.size == image.size and out.tobytes() == again.tobytes() and records == records_again
    assert records[0]["name"] == "realesrgan" and _psnr(image, out) < 35
    small, records = D.realesrgan_degradation(image, rng=0, resize_back=False)
    assert small.size == (32, 32)
    params = records[0]["params"]
    expected_keys = {"kernel1", "resize1", "noise1", "jpeg1", "kernel2", "resize2", "noise2", "final_sinc", "final"}
    assert set(params) >= expected_keys
    full_sigmas, light_sigmas = [], []
    for seed in range(30):
        for name, store in (("realesrgan", full_sigmas), ("realesrgan_light", light_sigmas)):
            _, records = D.apply_degradation_spec(_photo(32), name, seed)
            assert records[0]["name"] == name
            params = records[0]["params"]
            config = D.REALESRGAN if name == "realesrgan" else D.REALESRGAN_LIGHT
            assert config.jpeg_range[0] <= params["jpeg1"] <= config.jpeg_range[1]
            if params["noise1"]["type"] == "gaussian":
                assert config.noise_range[0] <= params["noise1"]["sigma"] <= config.noise_range[1]
                store.append(params["noise1"]["sigma"])
    assert max(light_sigmas) <= 15 and max(full_sigmas) > 15


def test_area_downsample_pair():
    photo = _photo(160)
    hq, lq, records = D.area_downsample_pair(photo, crop=64, rng=0)
    assert hq.size == (64, 64) and lq.size == (32, 32)
    left, top, right, bottom = records[0]["params"]["crop_box"]
    half = _array(photo).reshape(80, 2, 80, 2, 3).mean(axis=(1, 3))
    assert np.abs(_array(hq) - half[top:bottom, left:right]).max() <= 1  # area filter = 2x2 means
    assert np.abs(_array(lq) - _array(hq).reshape(32, 2, 32, 2, 3).mean(axis=(1, 3))).max() <= 1
    assert D.area_downsample_pair(photo, crop=64, rng=0)[0].tobytes() == hq.tobytes()
    with pytest.raises(ValueError, match="short side"):
        D.area_downsample_pair(photo, crop=128, rng=0)


def test_severity():
    hq = np.full((16, 16, 3), 100, np.uint8)
    assert D.severity(hq, hq) == {"mu": 0.0, "sigma": 0.0, "mu_bin": 0, "sigma_bin": 0}
    shifted = D.severity(hq, hq + 51)
    assert shifted["mu"] == pytest.approx(0.2) and shifted["sigma"] == pytest.approx(0.0, abs=1e-12)
    assert shifted["mu_bin"] == int(0.2 / 0.7 * 128)
    half = hq.copy()
    half[:8] = 255
    stats = D.severity(Image.fromarray(hq), Image.fromarray(half))
    assert stats["mu"] == pytest.approx(155 / 255 / 2) and stats["sigma"] == pytest.approx(155 / 255 / 2)
    assert D.severity(hq * 0, hq * 0 + 255)["mu_bin"] == 127  # mu = 1, beyond 0.7: last bin
    small = D.severity(Image.fromarray(hq), Image.fromarray(hq[:8, :8]))  # LQ resized to the HQ size
    assert small["mu"] == pytest.approx(0.0, abs=1e-9)


def test_rgb_helpers_are_the_image_io_ones():
    """to_rgb / load_rgb live in diffusers_restore.image_io (tested there); the data package re-exports them."""
    import diffusers_restore.data as data
    from diffusers_restore import image_io

    assert D.to_rgb is data.to_rgb is image_io.to_rgb and D.load_rgb is image_io.load_rgb


# ------------------------------------------------------------------ type-specific severity measures


def _smooth_photo(size=128, seed=3):
    """A smooth colour image without any 8 px structure (so its blockiness is about 1) and away from 0 / 255."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    base = np.stack([0.5 + 0.3 * np.sin(5.3 * x + 2.1 * y + c) for c in range(3)], axis=-1)
    detail = 0.05 * np.sin(37.0 * x * (1 + y))[..., None]
    noise = 0.01 * rng.standard_normal((size, size, 3))
    return Image.fromarray((np.clip(base + detail + noise, 0, 1) * 255).round().astype(np.uint8))


def test_noise_sigma_measures_added_gaussian_noise():
    clean = _smooth_photo()
    for sigma in (5.0, 20.0, 40.0):
        noisy, _ = D.gaussian_noise(clean, sigma, rng=0)
        residual = np.asarray(noisy, float) - np.asarray(clean, float)  # independent: numpy's std
        assert D.noise_sigma(clean, noisy) == pytest.approx(residual.std())
        assert D.noise_sigma(clean, noisy) == pytest.approx(sigma, rel=0.05)
    assert D.noise_sigma(clean, clean) == 0.0
    with pytest.raises(ValueError, match="differ in size"):
        D.noise_sigma(clean, clean.resize((64, 64)))


def test_blockiness_rises_with_jpeg_compression():
    clean = _smooth_photo()
    assert D.blockiness(clean) == pytest.approx(1.0, abs=0.1)
    values = [D.blockiness(D.jpeg(clean, quality)[0]) for quality in (90, 40, 10)]
    assert values[0] < values[1] < values[2] and values[2] > 1.5
    # a grid drawn on the 8 px boundaries is blocking by construction; the same grid shifted by 4 px is not
    grid = np.asarray(clean).copy()
    grid[:, 7::8] = 0
    shifted = np.asarray(clean).copy()
    shifted[:, 3::8] = 0
    assert D.blockiness(grid) > 2 and D.blockiness(shifted) < 1
    with pytest.raises(ValueError, match="at least 16 px"):
        D.blockiness(clean.resize((12, 40)))


def test_blur_sigma_recovers_the_gaussian_blur_width():
    clean = _smooth_photo()
    for kernel_size in (3, 7, 11):
        blurred, record = D.gaussian_blur(clean, kernel_size)
        assert D.blur_sigma(clean, blurred) == pytest.approx(record["params"]["sigma"], abs=0.051)
    assert D.blur_sigma(clean, clean) == 0.0


def test_identity_spec_returns_the_image_unchanged_and_mixes_with_others():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8))
    out, records = D.apply_degradation_spec(image, "identity", rng=0)
    assert np.array_equal(np.asarray(out), np.asarray(image)) and out is not image
    assert records == [{"name": "identity", "params": {}}]
    names = {D.apply_degradation_spec(image, "identity|jpeg:50", rng=seed)[1][0]["name"] for seed in range(20)}
    assert names == {"identity", "jpeg"}
    with pytest.raises(ValueError, match="at most 0"):
        D.parse_degradation_spec("identity:3")


def test_a_range_value_is_drawn_per_image_within_its_bounds():
    image = Image.new("RGB", (16, 16), (128, 90, 40))
    qualities = [D.apply_degradation_spec(image, "jpeg:quality=30..33", rng=seed)[1][0]["params"]["quality"]
                 for seed in range(40)]
    assert set(qualities) == {30, 31, 32, 33}
    sigmas = [D.apply_degradation_spec(image, "gaussian_blur:sigma=0.5..2", rng=seed)[1][0]["params"]["sigma"]
              for seed in range(40)]
    assert min(sigmas) >= 0.5 and max(sigmas) <= 2.0 and len(set(sigmas)) == 40
    spec = D.parse_degradation_spec("gaussian_noise:2..15")
    assert spec.params["sigma"] == D.ParameterRange(2.0, 15.0) and str(spec) == "gaussian_noise:sigma=2..15"
    first = D.apply_degradation_spec(image, spec, rng=7)
    again = D.apply_degradation_spec(image, spec, rng=7)
    assert np.array_equal(np.asarray(first[0]), np.asarray(again[0])) and first[1] == again[1]


@pytest.mark.parametrize("spec, message", [("jpeg:40..10", "low <= high"), ("jpeg:0..40", "quality"),
                                           ("jpeg:10..101", "quality"), ("gaussian_noise:a..3", "must be float")])
def test_bad_ranges_are_refused_at_parse_time(spec, message):
    with pytest.raises(ValueError, match=message):
        D.parse_degradation_spec(spec)
