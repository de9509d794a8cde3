"""The web app's work (`diffusers_restore.app.RestorationApp`), without a server or Gradio: opening uploads with the
package's messages, checks, simulated degradations with their scores, progress from the pipeline's progress bars,
one pipeline call at a time, cancelling, what the page shows of the model (read from its folder), and recovery after
a failing request. The served app is tested through Gradio's client and a real browser in test_app_server.py."""

import functools
import os
import threading
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter
from tqdm.auto import tqdm

from diffusers_restore.app import (
    DEGRADATION_CHOICES,
    NO_DEGRADATION,
    AppRequestError,
    RestorationApp,
    degradation_spec,
    describe_model_card,
    parse_tile_size,
    progress_markdown,
    sample_photo_files,
    trained_degradation,
)
from diffusers_restore.cli_common import BUNDLED, BUNDLED_MODEL_DIR, load_pipeline, resolve_model
from diffusers_restore.data.degradations import apply_degradation_spec, parse_degradation_spec


@pytest.fixture(scope="module")
def pipe():
    pipe = load_pipeline(resolve_model(BUNDLED))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def app(pipe, tmp_path):
    return RestorationApp(pipe, model_name=BUNDLED, max_image_side=128, output_dir=str(tmp_path / "outputs"))


def _photo(width: int = 64, height: int = 48, seed: int = 0) -> Image.Image:
    """A smooth colour image with some texture (a photo-like signal the bundled restorer handles)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    base = np.stack([0.5 + 0.4 * np.sin(6 * x + c) * np.cos(4 * y - c) for c in range(3)], axis=-1)
    texture = 0.03 * rng.standard_normal((height, width, 1))
    return Image.fromarray((np.clip(base + texture, 0, 1) * 255).round().astype(np.uint8))


def _psnr(a: Image.Image, b: Image.Image) -> float:
    mse = np.mean((np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)) ** 2)
    return float(10 * np.log10(255.0**2 / mse))


class StagedPipeline:
    """Stands in for a restoration pipeline that reports its work as diffusers pipelines do, through
    `self.progress_bar(total=..., desc=...)`: one tqdm bar per stage, tiles counted (tiles x steps while denoising;
    that stage iterates its bar, the others update it). Its "restoration" is a small blur."""

    stages = (("degradation removal", 4), ("VAE encode", 4), ("denoising", 8), ("VAE decode", 4))
    sampling_defaults = {"num_inference_steps": 2, "guidance_scale": 1.0, "restoration_guidance": None,
                         "strength": 1.0, "fidelity": 0.0}
    scheduler = SimpleNamespace(config={"restoration_guidance_tau": 0.0})
    vae_scale_factor = size_multiple = 8
    default_tile_size = 64
    text_encoder = tokenizer = None
    name_or_path = ""

    def __init__(self):
        self.work: list[tuple[str, int]] = []

    def check_inputs(self, **kwargs):  # this stand-in accepts every setting
        pass

    def resolve_sampling_arguments(self, **given):
        return {name: given.get(name, value) for name, value in self.sampling_defaults.items()}

    def progress_bar(self, iterable=None, total=None, desc=None):
        return tqdm(iterable, total=total, desc=desc, disable=True)

    def __call__(self, image, generator=None, **kwargs):
        for stage, tiles in self.stages:
            if stage == "denoising":
                for tile in self.progress_bar(range(tiles), desc=stage):
                    self.work.append((stage, tile))
                continue
            with self.progress_bar(total=tiles, desc=stage) as bar:
                for tile in range(tiles):
                    self.work.append((stage, tile))
                    bar.update()
        return SimpleNamespace(images=[image.convert("RGB").filter(ImageFilter.BoxBlur(1))])


def test_every_menu_degradation_is_a_valid_spec():
    for choice, entry in DEGRADATION_CHOICES.items():
        spec = degradation_spec(choice)
        if entry is None:
            assert spec is None
            continue
        parse_degradation_spec(spec)
        if entry.has_level:
            for level in (entry.minimum, entry.maximum):
                parse_degradation_spec(degradation_spec(choice, level))
    assert degradation_spec("JPEG compression", 30) == "jpeg:30"
    assert degradation_spec("Downscale then upscale", 2.5) == "downscale:2.5"
    with pytest.raises(ValueError, match="unknown degradation 'sharpen'"):
        degradation_spec("sharpen")
    with pytest.raises(ValueError, match="quality"):
        degradation_spec("JPEG compression", 0)


def test_tile_size_field_says_the_rule_in_plain_words():
    assert parse_tile_size("auto", 8) is None and parse_tile_size("", 8) is None and parse_tile_size(None) is None
    assert parse_tile_size(" 64 ", 8) == 64 and parse_tile_size("0", 8) == 0
    for bad in ("big", "33", "-8", "6.5"):
        with pytest.raises(AppRequestError) as refused:
            parse_tile_size(bad, 8)
        message = str(refused.value)
        assert f"Tile size '{bad}' is not allowed" in message
        assert "'auto', 0 (never split the photo into tiles), or a whole number of pixels that is a multiple of 8 " \
               "(such as 64 or 128)" in message


# ---------------------------------------------------------------------------------------------- the model's folder


def test_the_model_card_gives_a_one_line_description():
    card = ("---\nlicense: apache-2.0\ntags:\n- x\n---\n\n# my-restorer\n\n![logo](logo.png)\n\n"
            "A denoiser for phone photos: removes sensor noise,\nbarely touches blur.\n\n## Usage\n\nmore text\n")
    assert describe_model_card(card) == "A denoiser for phone photos: removes sensor noise, barely touches blur."
    long = "# t\n\n" + "First sentence here. " + "word " * 100
    assert describe_model_card(long, limit=60) == "First sentence here."
    assert describe_model_card(None) is None and describe_model_card("---\na: 1\n---\n# Title only\n") is None


def test_the_page_describes_the_loaded_model_from_its_own_folder(app, pipe, tmp_path):
    with open(os.path.join(BUNDLED_MODEL_DIR, "README.md"), encoding="utf-8") as handle:
        card = handle.read()
    assert app.model_card == card  # read from the pipeline's folder
    line = app.describe_model()
    description = describe_model_card(card)
    assert line == f"**Model:** `{BUNDLED}`. {description}" and "\n" not in line
    # the description is the card's own opening prose, not text of the app
    assert description.rstrip(".") in " ".join(card.split())
    # a folder without a card says so
    bare = RestorationApp(StagedPipeline(), model_name="org/other", output_dir=str(tmp_path))
    assert bare.describe_model() == "**Model:** `org/other`. Its folder has no model card (README.md) describing it."
    folder = RestorationApp(StagedPipeline(), model_name=str(tmp_path) + "/", output_dir=str(tmp_path))
    assert folder.describe_model().startswith(f"**Model:** `{tmp_path.name}`.")


def test_the_first_degradation_is_one_the_model_was_trained_on(app):
    assert trained_degradation("Degradations: `jpeg:30|gaussian_noise`.") == ("JPEG compression", 30.0)
    assert trained_degradation("Degradations: `gaussian_noise|jpeg`") == ("Gaussian noise", 25.0)  # menu default
    assert trained_degradation("Degradations: `realesrgan`") == ("Real-ESRGAN (blur, resize, noise, JPEG)", 0.0)
    assert trained_degradation("Degradations: `jpeg:99`") == ("JPEG compression", 20.0)  # outside the menu's range
    assert trained_degradation("Degradations: `poisson_noise`") is None
    assert trained_degradation("no record") is None and trained_degradation(None) is None
    # the bundled model's card records what it was trained on; the page starts with the first one the menu has
    choice, level = app.sample_degradation
    recorded = app.model_card.split("Degradations: `")[1].split("`")[0]
    assert DEGRADATION_CHOICES[choice].name in recorded and degradation_spec(choice, level)
    assert RestorationApp(StagedPipeline(), output_dir=app.output_dir).sample_degradation == (NO_DEGRADATION, None)


def test_controls_that_do_nothing_are_decided_from_the_folder(app, tmp_path):
    assert app.disabled_controls() == {}  # the bundled pipeline has a tokenizer and text encoder
    no_text = RestorationApp(StagedPipeline(), output_dir=str(tmp_path)).disabled_controls()
    assert set(no_text) == {"prompt", "guidance_scale"}
    assert all("no text encoder" in reason for reason in no_text.values())


def test_sample_photos_fit_the_side_limit(tmp_path):
    pytest.importorskip("skimage")
    files = sample_photo_files(str(tmp_path), max_side=100)
    assert files and all(os.path.basename(path).endswith(".png") for path in files)
    for path in files:
        with Image.open(path) as photo:
            assert max(photo.size) == 100


# ------------------------------------------------------------------------------------------------------ uploads


def test_uploads_are_opened_with_the_packages_messages_and_never_their_path(app, tmp_path):
    uploads = tmp_path / "server-uploads"
    uploads.mkdir()
    text = uploads / "notanimage.png"
    text.write_text("hello, I am not an image")
    empty = uploads / "empty.png"
    empty.write_bytes(b"")
    tiny = uploads / "tiny.png"
    Image.new("RGB", (app.min_image_side - 1, 40)).save(tiny)
    large = uploads / "large.png"
    _photo(200, 40).save(large)
    expected = {
        text: "notanimage.png: cannot identify image file: not an image, or a format PIL cannot read.",
        empty: "empty.png: the file is empty (0 bytes).",
        tiny: f"the image tiny.png is {app.min_image_side - 1}x40 px; this model needs at least "
              f"{app.min_image_side} px per side.",
        large: "the image large.png is 200x40 px; this app accepts at most 128 px per side",
    }
    for path, message in expected.items():
        with pytest.raises(AppRequestError) as refused:
            app.open_image(str(path), path.name)
        assert str(refused.value).startswith(message)
        assert str(uploads) not in str(refused.value)
    # the visitor's own file name is the one named
    with pytest.raises(AppRequestError, match=r"^holiday\.png: cannot identify"):
        app.open_image(str(text), "holiday.png")


def test_a_cmyk_jpeg_is_opened_and_restored(app, tmp_path):
    path = tmp_path / "print.jpg"
    _photo(64, 48).convert("CMYK").save(path, quality=95)
    image = app.open_image(str(path))
    assert image.mode == "CMYK"
    result = app.restore(image, "Gaussian noise", 25, input_name="print.jpg")
    assert os.path.basename(result.output_path) == "print_restored.png"
    with Image.open(result.output_path) as saved:
        assert saved.mode == "RGB" and saved.size == (64, 48)
    assert result.scores["restored"]["psnr"] > 0


def test_outputs_are_named_after_the_input_and_never_collide(app):
    names = [os.path.basename(app.restore(_photo(32, 32), input_name=name).output_path)
             for name in ("holiday photo.JPG", "../../etc/passwd", "", None)]
    assert names == ["holiday_photo_restored.png", "passwd_restored.png", "image_restored.png", "image_restored.png"]
    first = app.restore(_photo(32, 32, seed=1), input_name="same.png").output_path
    second = app.restore(_photo(32, 32, seed=2), input_name="same.png").output_path
    assert first != second and os.path.isfile(first) and os.path.isfile(second)


# ----------------------------------------------------------------------------------------------------- restoring


def test_restore_an_upload_uses_the_models_defaults(app, pipe):
    image = _photo()
    result = app.restore(image, seed=3)
    assert result.scores is None  # no clean reference
    assert result.restored.size == image.size
    with Image.open(result.output_path) as saved:
        assert saved.format == "PNG"
        assert np.array_equal(np.asarray(saved.convert("RGB")), np.asarray(result.restored.convert("RGB")))
    for name, value in pipe.sampling_defaults.items():
        assert result.settings[name] == value
    # the same call as a user's plain pipe(image) with that seed
    expected = pipe(image, generator=torch.Generator().manual_seed(3)).images[0]
    assert np.array_equal(np.asarray(expected), np.asarray(result.restored))


def test_simulated_degradation_is_scored_against_the_clean_photo(app):
    clean = _photo(seed=1)
    result = app.restore(clean, "Gaussian noise", 25, seed=7)
    expected_degraded, _ = apply_degradation_spec(clean, "gaussian_noise:25", np.random.default_rng(7))
    assert np.array_equal(np.asarray(result.input_image), np.asarray(expected_degraded))
    assert result.settings["simulated_degradation"] == "gaussian_noise:25"
    assert result.scores["degraded"]["psnr"] == pytest.approx(_psnr(expected_degraded, clean), abs=0.01)
    assert result.scores["restored"]["psnr"] == pytest.approx(_psnr(result.restored, clean), abs=0.01)
    assert 0 < result.scores["restored"]["ssim"] <= 1


def test_upscaled_output_has_no_scores_and_respects_the_side_limit(app):
    result = app.restore(_photo(40, 32), "JPEG compression", 20, upscale=2)
    assert result.restored.size == (80, 64)
    assert result.scores is None
    with pytest.raises(AppRequestError, match=r"upscale 4 would make a 160x128 px image; .*at most 128 px per side"):
        app.restore(_photo(40, 32), upscale=4)


def test_bad_requests_are_refused_with_a_message_before_any_work(app, pipe, monkeypatch):
    calls = []
    original = type(pipe).__call__

    @functools.wraps(original)  # keeps the signature that the pipeline's argument check reads
    def recorded(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(type(pipe), "__call__", recorded)
    with pytest.raises(AppRequestError, match=r"the image is 200x40 px; this app accepts at most 128 px per side"):
        app.restore(_photo(200, 40))
    with pytest.raises(AppRequestError, match="no image"):
        app.restore(None)
    with pytest.raises(AppRequestError, match="degradation: .*kernel"):
        app.restore(_photo(), "Gaussian blur", 4)
    # a setting the pipeline refuses carries the pipeline's own message
    with pytest.raises(ValueError) as expected:
        pipe.check_inputs(tile_size=33)
    with pytest.raises(AppRequestError) as refused:
        app.restore(_photo(), tile_size=33)
    assert str(refused.value) == str(expected.value)
    assert calls == []


def test_progress_comes_from_the_pipelines_bars_stage_by_stage(tmp_path):
    staged = StagedPipeline()
    app = RestorationApp(staged, output_dir=str(tmp_path))
    seen = []
    result = app.restore(_photo(), on_progress=lambda *update: seen.append(update))
    expected = []
    for stage, tiles in StagedPipeline.stages:
        expected += [(stage, done, tiles) for done in range(tiles + 1)]
    assert seen == expected
    assert result is not None and "progress_bar" not in vars(staged)  # the pipeline's own method is back
    assert progress_markdown("VAE decode", 6, 12, 14.2) == "**Restoring** · VAE decode 6/12 ▰▰▰▰▰▱▱▱▱▱ · 14 s"


def test_progress_of_the_bundled_pipeline(app):
    seen = []
    app.restore(_photo(), on_progress=lambda *update: seen.append(update))
    assert seen and seen[0][1] == 0, seen
    bars = []  # each bar reports (stage, 0, total) when it opens, then each of its tiles
    for stage, done, total in seen:
        if done == 0:
            bars.append((stage, total, []))
        assert (stage, total) == bars[-1][:2], seen
        bars[-1][2].append(done)
    for stage, total, counts in bars:
        assert total >= 1 and counts == list(range(total + 1)), (stage, total, counts)
    assert "denoising" in [stage for stage, _, _ in bars]


@pytest.mark.parametrize("stop_at", [("VAE encode", 1), ("denoising", 3), ("VAE decode", 2)])
def test_cancel_stops_at_the_next_tile_of_any_stage(tmp_path, stop_at):
    staged = StagedPipeline()
    app = RestorationApp(staged, output_dir=str(tmp_path))

    def on_progress(stage, done, total):
        if (stage, done) == stop_at:
            assert app.cancel("visitor") and app.cancel_requested("visitor")

    assert app.restore(_photo(), session="visitor", on_progress=on_progress) is None
    stage, done = stop_at
    assert staged.work[-1] == (stage, done)  # the tile running when Stop came was the last one worked on
    assert not app.cancel("visitor") and not app.cancel_requested("visitor")  # nothing running any more
    assert os.listdir(tmp_path) == []  # nothing was written
    staged.work.clear()
    assert app.restore(_photo(), session="visitor") is not None  # the next request runs whole
    assert len(staged.work) == sum(tiles for _, tiles in StagedPipeline.stages)


def test_a_request_stopped_while_it_waits_does_not_run(tmp_path):
    staged = StagedPipeline()
    app = RestorationApp(staged, output_dir=str(tmp_path))
    app.prepare("visitor")  # the page's Restore click, before the request's turn comes
    assert app.cancel("visitor")
    assert app.restore(_photo(), session="visitor") is None
    assert staged.work == []
    assert app.restore(_photo(), session="visitor") is not None


def test_cancel_discards_a_real_pipelines_half_done_result(app, pipe):
    def on_progress(stage, done, total):
        if done == 1:
            assert app.cancel("visitor")

    settings = {"num_inference_steps": 4, "fidelity": 0.0}
    assert app.restore(_photo(), session="visitor", on_progress=on_progress, **settings) is None
    after = app.restore(_photo(), session="visitor", seed=0, **settings)
    fresh = pipe(_photo(), generator=torch.Generator().manual_seed(0), num_inference_steps=4, fidelity=0.0).images[0]
    assert np.array_equal(np.asarray(after.restored), np.asarray(fresh))


def test_a_failing_request_does_not_break_the_next(app, pipe, monkeypatch):
    original = type(pipe).__call__
    failures = iter([True])

    @functools.wraps(original)
    def flaky(self, *args, **kwargs):
        if next(failures, False):
            raise RuntimeError("simulated failure")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(type(pipe), "__call__", flaky)
    with pytest.raises(RuntimeError, match="simulated failure"):
        app.restore(_photo())
    assert "progress_bar" not in vars(pipe)
    assert app.restore(_photo()).restored.size == (64, 48)  # the lock was released


def test_one_pipeline_call_at_a_time(tmp_path):
    active, most = [0], [0]
    guard = threading.Lock()

    class CountedPipeline(StagedPipeline):
        def __call__(self, *args, **kwargs):
            with guard:
                active[0] += 1
                most[0] = max(most[0], active[0])
            try:
                return super().__call__(*args, **kwargs)
            finally:
                with guard:
                    active[0] -= 1

    app = RestorationApp(CountedPipeline(), output_dir=str(tmp_path))
    results = [None] * 3
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, app.restore(_photo(seed=i), seed=i)))
               for i in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all(result is not None for result in results)
    assert most[0] == 1


def test_app_arguments_are_checked(app):
    assert NO_DEGRADATION in DEGRADATION_CHOICES and DEGRADATION_CHOICES[NO_DEGRADATION] is None
    with pytest.raises(ValueError, match="max_image_side"):
        RestorationApp(app.pipe, max_image_side=0)


def test_controls_start_at_the_models_defaults_and_untouched_ones_are_not_passed(pipe, tmp_path, monkeypatch):
    scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, restoration_guidance_tau=2.5)
    monkeypatch.setattr(pipe, "scheduler", scheduler)
    monkeypatch.setitem(pipe.config, "sampling_defaults", {"num_inference_steps": 3, "guidance_scale": 2.0})
    app = RestorationApp(pipe, output_dir=str(tmp_path))
    start = app.control_defaults
    # restoration_guidance None means "the scheduler's configured strength": the control shows that value
    assert start["num_inference_steps"] == 3 and start["guidance_scale"] == 2.0
    assert start["restoration_guidance"] == 2.5 and start["strength"] == 1.0 and start["upscale"] == 1.0
    # a control left where it started is not passed, so the model's own default (not a copy of it) applies
    assert app.call_arguments(**{name: value for name, value in start.items()}) == {"color_fix": "wavelet"}
    assert app.call_arguments(num_inference_steps=5.0, restoration_guidance=0.0, color_fix="none") == {
        "num_inference_steps": 5, "restoration_guidance": 0.0, "color_fix": None}


def test_the_output_folder_keeps_only_the_newest_pngs(tmp_path):
    app = RestorationApp(StagedPipeline(), output_dir=str(tmp_path), keep_outputs=2)
    (tmp_path / "notes.txt").write_text("not ours")
    paths = [app.restore(_photo(32, 32, seed=seed), input_name=f"p{seed}.png").output_path for seed in range(4)]
    kept = sorted(os.path.join(root, name) for root, _, names in os.walk(tmp_path) for name in names)
    assert kept == sorted([paths[-2], paths[-1], str(tmp_path / "notes.txt")])
