"""`sana-restore app` served for real: launched in a subprocess on 127.0.0.1 with the bundled restorer, driven through
Gradio's own client (`gradio_client`) and through a headless Chromium (selenium with Debian's chromium-driver), as a
first-time visitor meets it at 1400x1000 and at 420x900.

Needs the app extra (gradio, gradio_client; in the test extra). The browser test also needs selenium and Debian's
`chromium` and `chromium-driver` (`bash scripts/install_browser.sh`; CI runs it); where they are missing it is skipped
with that reason. Set SANA_RESTORE_APP_SCREENSHOTS=folder to keep the browser's screenshots (README's and the Space's
come from it).
"""

import concurrent.futures
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest
from PIL import Image

gradio_client = pytest.importorskip("gradio_client", reason="the app extra (gradio) is not installed")
pytest.importorskip("gradio", reason="the app extra (gradio) is not installed")

from diffusers_restore.app import (  # noqa: E402 - after the skip
    CANCELLED,
    DEGRADATION_CHOICES,
    NO_DEGRADATION,
    describe_model_card,
    read_model_card,
)
from diffusers_restore.cli_common import BUNDLED_MODEL_DIR  # noqa: E402
from diffusers_restore.sample_photos import load_photo  # noqa: E402

MAX_SIDE = 640
MAX_FILE_SIZE = "300kb"
CHROMEDRIVER = "/usr/bin/chromedriver"
CHROMIUM = "/usr/bin/chromium"
PROGRESS = re.compile(r"Restoring\** · (.+?) (\d+)/(\d+)")  # in Markdown (API) or as shown


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The app on a free port; yields its URL. The server's log is shown if it fails to start."""
    port = _free_port()
    log_path = tmp_path_factory.mktemp("app") / "server.log"
    # one torch thread: the tiny model gains nothing from more, and a busy test machine loses a lot to them
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "diffusers_restore.cli", "app", "--model", "bundled", "--port", str(port),
               "--max-image-side", str(MAX_SIDE), "--max-file-size", MAX_FILE_SIZE]
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 180
        while True:
            if process.poll() is not None:
                pytest.fail(f"the app exited with status {process.returncode}:\n{log_path.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(url, timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"the app did not answer within 180 s:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.5)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()


@pytest.fixture(scope="module")
def client(server):
    return gradio_client.Client(server, verbose=False)


def _photo_file(folder, width: int = 96, height: int = 64, seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    base = np.stack([0.5 + 0.4 * np.sin(6 * x + c) * np.cos(4 * y - c) for c in range(3)], axis=-1)
    pixels = np.clip(base + 0.03 * rng.standard_normal((height, width, 1)), 0, 1)
    path = os.path.join(str(folder), f"photo_{width}x{height}_{seed}.png")
    Image.fromarray((pixels * 255).round().astype(np.uint8)).save(path)
    return path


def _bad_files(folder) -> dict[str, str]:
    """A text file named .png and a 0-byte file, with the message each must get."""
    text = os.path.join(str(folder), "notanimage.png")
    with open(text, "w") as handle:
        handle.write("hello, I am not an image\n")
    empty = os.path.join(str(folder), "empty.png")
    open(empty, "wb").close()
    return {text: "notanimage.png: cannot identify image file: not an image, or a format PIL cannot read.",
            empty: "empty.png: the file is empty (0 bytes)."}


def _cmyk_jpeg(folder, width: int = 160, height: int = 120) -> str:
    path = os.path.join(str(folder), "cmyk_coffee.jpg")
    load_photo("coffee").resize((width, height)).convert("CMYK").save(path, quality=90)
    return path


def _restore(client, path, **kwargs):
    return client.predict(image=gradio_client.handle_file(path), api_name="/restore", **kwargs)


def test_restore_an_upload(client, tmp_path):
    path = _photo_file(tmp_path)
    comparison, download, scores_text, details, status = _restore(client, path)
    assert os.path.basename(download) == "photo_96x64_0_restored.png"
    with Image.open(download) as restored:
        assert restored.format == "PNG" and restored.size == (96, 64)
    assert len(comparison) == 2
    assert details["scores"] is None and "simulate a degradation" in scores_text
    assert details["settings"]["num_inference_steps"] == 1  # the bundled model's recorded default
    assert status.startswith("**Done**") and "photo_96x64_0_restored.png" in status


def test_restore_with_a_simulated_degradation_returns_psnr(client, tmp_path):
    path = _photo_file(tmp_path, seed=1)
    _, download, scores_text, details, _ = _restore(client, path, degradation="Gaussian noise", level=25, seed=5)
    scores = details["scores"]
    assert details["settings"]["simulated_degradation"] == "gaussian_noise:25"
    with Image.open(download) as restored, Image.open(path) as clean:
        mse = np.mean((np.asarray(restored.convert("RGB"), float) - np.asarray(clean.convert("RGB"), float)) ** 2)
    assert scores["restored"]["psnr"] == pytest.approx(10 * np.log10(255.0**2 / mse), abs=0.01)
    assert f"{scores['restored']['psnr']:.2f}" in scores_text and "PSNR" in scores_text


def test_bad_files_get_the_packages_message_and_no_server_path(client, tmp_path):
    for path, message in _bad_files(tmp_path).items():
        with pytest.raises(gradio_client.exceptions.AppError) as refused:
            _restore(client, path)
        assert str(refused.value) == message  # no temporary upload path, no exception name
    oversized = _photo_file(tmp_path, width=MAX_SIDE + 40, height=32)
    with pytest.raises(gradio_client.exceptions.AppError,
                       match=rf"{MAX_SIDE + 40}x32 px; this app accepts at most {MAX_SIDE} px per side"):
        _restore(client, oversized)
    # the next request is served normally
    assert _restore(client, _photo_file(tmp_path, seed=2))[1]


def test_a_cmyk_jpeg_is_restored(client, tmp_path):
    comparison, download, _, details, _ = _restore(client, _cmyk_jpeg(tmp_path), degradation="JPEG compression",
                                                    level=30)
    assert os.path.basename(download) == "cmyk_coffee_restored.png"
    with Image.open(download) as restored, Image.open(comparison[0]) as before:
        assert restored.mode == "RGB" and restored.size == (160, 120) and before.mode == "RGB"
    assert details["scores"]["restored"]["psnr"] > 0


def test_upload_above_the_file_size_limit_is_refused(client, tmp_path):
    noise = np.random.default_rng(0).integers(0, 256, (320, 320, 3), dtype=np.uint8)
    path = str(tmp_path / "noise.png")
    Image.fromarray(noise).save(path)
    assert os.path.getsize(path) > 300 * 1024  # incompressible: about 307 kB
    with pytest.raises(Exception, match="exceeds the maximum file size of 307200 bytes"):  # 300 kB = 300 * 1024
        _restore(client, path)


def test_invalid_settings_are_refused_in_plain_words(client, tmp_path):
    with pytest.raises(gradio_client.exceptions.AppError,
                       match=r"Tile size '33' is not allowed: write 'auto', 0 \(never split the photo into tiles\), "
                             r"or a whole number of pixels that is a multiple of 8"):
        _restore(client, _photo_file(tmp_path), tile_size="33")
    with pytest.raises(gradio_client.exceptions.AppError, match="`fidelity`"):  # the pipeline's own message
        _restore(client, _photo_file(tmp_path), fidelity=3)


def test_two_concurrent_requests_are_both_answered(server, tmp_path):
    paths = [_photo_file(tmp_path, seed=seed) for seed in (3, 4)]
    clients = [gradio_client.Client(server, verbose=False) for _ in paths]
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(_restore, client, path, degradation="JPEG compression", level=20)
                   for client, path in zip(clients, paths)]
        results = [future.result(timeout=300) for future in futures]
    for result in results:
        assert result[3]["scores"]["restored"]["psnr"] > 0
        with Image.open(result[1]) as restored:
            assert restored.size == (96, 64)


def test_stop_cancels_a_running_request_which_returns_nothing(server, tmp_path):
    client = gradio_client.Client(server, verbose=False)
    job = client.submit(image=gradio_client.handle_file(_photo_file(tmp_path, 128, 128, seed=6)),
                        num_inference_steps=200, fidelity=0.0, api_name="/restore")
    deadline = time.monotonic() + 120
    while not any(PROGRESS.search(output[4]) for output in job.outputs()):  # wait until it reports progress
        assert not job.done(), "the request ended before it could be cancelled"
        assert time.monotonic() < deadline, "no progress was reported"
        time.sleep(0.02)
    client.predict(api_name="/cancel")  # what the Stop button calls
    outputs = job.result(timeout=120)
    # nothing is returned: every result is left as it was (Gradio's "skip" update), no image, no file
    assert all(isinstance(output, dict) and set(output) == {"__type__"} for output in outputs[:4]), outputs
    assert outputs[4] == CANCELLED
    assert _restore(client, _photo_file(tmp_path, seed=8))[1]  # the next request is served


def test_every_setting_explains_itself_and_the_ones_without_effect_say_why(server):
    with urllib.request.urlopen(server + "config", timeout=30) as response:
        config = json.load(response)
    settings = {component["props"]["elem_id"]: component["props"] for component in config["components"]
                if component.get("props", {}).get("elem_id") in (
                    "prompt", "steps", "guidance", "restoration-guidance", "strength", "fidelity", "color-fix",
                    "upscale", "seed", "tile-size", "degradation")}
    assert len(settings) == 11
    for elem_id, props in settings.items():
        assert props["info"] and len(props["info"]) > 30, elem_id
        assert not re.search(r"num_inference_steps|classifier-free|noise schedule", props["info"]), elem_id
    # the bundled model records one step: restoration guidance and strength act only between steps
    assert settings["steps"]["value"] == 1 and "made for 1 step" in settings["steps"]["info"]
    for elem_id in ("restoration-guidance", "strength"):
        assert settings[elem_id]["interactive"] is False and "Unavailable at 1 step" in settings[elem_id]["info"]
    assert settings["prompt"]["interactive"] is not False  # it has a text encoder
    assert "multiple of 8" in settings["tile-size"]["info"]
    # the page opens with a degradation the model was trained on (see the browser test); the API's default is none
    assert settings["degradation"]["value"] == NO_DEGRADATION


def _browser_missing() -> str:
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install selenium)"
    for path in (CHROMEDRIVER, CHROMIUM):
        if not (os.path.isfile(path) or shutil.which(os.path.basename(path))):
            return f"{path} is missing: bash scripts/install_browser.sh (apt-get install chromium chromium-driver)"
    return ""


# Records the status line and the two buttons' states at every change of the page, so that short-lived states
# (Restore busy, a progress line) are seen however fast the request runs.
_RECORD_STATES = """
window.statusLog = [];
const record = () => {
  const status = document.querySelector('#status .prose'), run = document.querySelector('#restore-button'),
        stop = document.querySelector('#stop-button');
  if (!status || !run || !stop) return;
  const entry = [status.innerText.trim(), run.disabled, stop.disabled];
  const last = window.statusLog[window.statusLog.length - 1];
  if (!last || last.join('|') !== entry.join('|')) window.statusLog.push(entry);
};
new MutationObserver(record).observe(document.body, {subtree: true, childList: true, characterData: true,
                                                     attributes: true});
record();
"""

# The error and progress badges Gradio draws over an output, when shown.
_VISIBLE_BADGES = """
return Array.from(document.querySelectorAll('#status .error, #scores .error, #comparison .error, #download .error,'
                                            + ' #status .progress-text, #scores .progress-text'))
  .filter(e => e.checkVisibility({opacityProperty: true, visibilityProperty: true})
               && e.getBoundingClientRect().width > 0).map(e => e.textContent.trim());
"""


@pytest.mark.skipif(bool(_browser_missing()), reason=_browser_missing() or "browser present")
def test_restore_in_a_real_browser(server, tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                     "--hide-scrollbars", "--window-size=1400,1000"):
        options.add_argument(argument)
    keep = os.environ.get("SANA_RESTORE_APP_SCREENSHOTS")
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)  # explicit driver: no download
    wait = WebDriverWait(driver, 180)

    def open_page(width: int, height: int) -> None:
        driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                               {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False})
        driver.get(server)
        wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#input-image img")))  # the sample is loaded
        wait.until(lambda _: driver.find_element(By.CSS_SELECTOR, "#degradation input").get_attribute("value")
                   != NO_DEGRADATION)  # and the degradation to simulate chosen
        driver.execute_script(_RECORD_STATES)

    def status() -> str:
        return driver.find_element(By.CSS_SELECTOR, "#status .prose").text

    def wait_status(start: str) -> str:
        try:
            wait.until(lambda _: status().startswith(start))
        except Exception:
            pytest.fail(f"the status never started with {start!r}; it reads {status()!r}; its changes: "
                        f"{driver.execute_script('return window.statusLog;')}")
        return status()

    def upload(path: str) -> None:
        driver.find_element(By.CSS_SELECTOR, "#input-image input[type=file]").send_keys(path)

    def restore_and_wait() -> str:
        driver.execute_script("window.statusLog.length = 0;")
        driver.find_element(By.CSS_SELECTOR, "#restore-button").click()
        done = wait_status("Done")
        wait.until(lambda _: not driver.find_element(By.CSS_SELECTOR, "#restore-button").get_attribute("disabled"))
        return done

    def slider_images() -> list[Image.Image]:
        sources = driver.execute_script(
            "return Array.from(document.querySelectorAll('#comparison img')).map(img => img.src);")
        images = []
        for source in sources:
            with urllib.request.urlopen(source, timeout=30) as response, Image.open(response) as image:
                images.append(image.convert("RGB"))
        return images

    def download_names() -> list[str]:
        return driver.execute_script(
            "return Array.from(document.querySelectorAll('#download a[download], #comparison a[download]'))"
            ".map(a => a.getAttribute('download'));")

    def page_text() -> str:
        return driver.find_element(By.TAG_NAME, "body").text

    def screenshot(name: str) -> None:
        if not keep:
            return
        os.makedirs(keep, exist_ok=True)
        path = os.path.join(keep, f"{name}.png")
        driver.save_screenshot(path)
        with Image.open(path) as shot:
            small = shot.convert("RGB")
        if small.width > 1000:
            small = small.resize((small.width * 3 // 4, small.height * 3 // 4), Image.Resampling.LANCZOS)
        small.quantize(colors=96, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)

    card = read_model_card(BUNDLED_MODEL_DIR)
    recorded = card.split("Degradations: `")[1].split("`")[0]
    try:
        # 1. The first page is ready: a sample photo, a degradation the model was trained on, the model described.
        open_page(1400, 1000)
        choice = driver.find_element(By.CSS_SELECTOR, "#degradation input").get_attribute("value")
        assert DEGRADATION_CHOICES[choice].name in recorded, (choice, recorded)
        assert re.sub(r"[`*_]", "", describe_model_card(card)) in page_text()
        run, stop = (driver.find_element(By.CSS_SELECTOR, selector) for selector in ("#restore-button", "#stop-button"))
        assert stop.get_attribute("disabled")  # nothing runs
        assert stop.size["height"] < run.size["height"]  # smaller than Restore, and not coloured like it
        assert stop.value_of_css_property("background-color") != run.value_of_css_property("background-color")
        screenshot("first_load")

        # One click on Restore shows a change, named after the sample; Restore is busy meanwhile.
        done = restore_and_wait()
        assert "coffee_restored.png" in done
        before, after = slider_images()
        assert before.size == after.size
        change = np.abs(np.asarray(before, float) - np.asarray(after, float)).mean()
        assert change > 8, f"before and after differ by only {change:.1f}/255"
        log = driver.execute_script("return window.statusLog;")
        assert any(text.startswith(("Waiting", "Restoring")) and run and not stop for text, run, stop in log), log
        assert log[-1][1:] == [False, True], log  # Restore active again, Stop inactive
        assert download_names() == ["coffee_restored.png", "coffee_restored.png"]
        assert driver.execute_script(  # the slider's sides are labelled on the image
            "const side = document.querySelector('#comparison .slider-wrap');"
            "return [getComputedStyle(side, '::before').content, getComputedStyle(side, '::after').content];"
        ) == ['"Before"', '"Restored"']
        wait.until(ec.text_to_be_present_in_element((By.CSS_SELECTOR, "#scores"), "PSNR"))
        assert driver.execute_script(_VISIBLE_BADGES) == []
        screenshot("result")

        # 2. Bad uploads get the package's one-line message at upload, and never a server path.
        for path, message in _bad_files(tmp_path).items():
            upload(path)
            wait_status(f"⚠ Refused: {message}")
            text = page_text()
            assert "/tmp" not in text and str(tmp_path) not in text and "Error" not in text, text[:2000]

        # A CMYK JPEG restores and downloads.
        upload(_cmyk_jpeg(tmp_path))
        wait_status("Ready")
        assert "cmyk_coffee_restored.png" in restore_and_wait()
        assert download_names() == ["cmyk_coffee_restored.png"] * 2

        # 3. A large image shows its progress stage by stage and tile by tile under Restore; Stop cancels it. (20
        # steps make its denoising stage long enough to be stopped in.)
        large = str(tmp_path / "large.jpg")
        load_photo("chelsea").resize((MAX_SIDE, MAX_SIDE * 3 // 4)).save(large, quality=90)
        upload(large)
        wait_status("Ready")
        driver.find_element(By.XPATH, "//button[contains(., 'Advanced settings')]").click()
        steps = wait.until(ec.visibility_of_element_located((By.CSS_SELECTOR, "#steps input[type=number]")))
        steps.clear()
        steps.send_keys("20\t")
        wait.until(lambda _: driver.find_element(By.CSS_SELECTOR, "#strength input[type=range]").is_enabled())
        driver.execute_script("window.statusLog.length = 0;")
        driver.find_element(By.CSS_SELECTOR, "#restore-button").click()

        def progress_seen():
            seen = [PROGRESS.search(entry[0]) for entry in driver.execute_script("return window.statusLog;")]
            return [(match.group(1), int(match.group(2)), int(match.group(3))) for match in seen if match]

        def stages_and_tiles(_):
            seen = progress_seen()
            return len({stage for stage, _, _ in seen}) >= 2 and any(total > 1 for _, _, total in seen)

        try:
            WebDriverWait(driver, 180, poll_frequency=0.1).until(stages_and_tiles)
        except Exception:
            pytest.fail(f"no stage and tile progress was shown: {driver.execute_script('return window.statusLog;')}")
        driver.find_element(By.CSS_SELECTOR, "#stop-button").click()
        assert wait_status("Cancelled") == CANCELLED.replace("**", "")
        wait.until(lambda _: not driver.find_element(By.CSS_SELECTOR, "#restore-button").get_attribute("disabled"))
        assert driver.find_element(By.CSS_SELECTOR, "#stop-button").get_attribute("disabled")
        steps.clear()
        steps.send_keys("1\t")

        # 5. An error at Restore stays off the scores; picking a sample clears it.
        tile = driver.find_element(By.CSS_SELECTOR, "#tile-size textarea")
        tile.clear()
        tile.send_keys("33")
        driver.find_element(By.CSS_SELECTOR, "#restore-button").click()
        assert "multiple of 8" in wait_status("⚠ Not restored: Tile size '33' is not allowed")
        assert driver.execute_script(_VISIBLE_BADGES) == []
        driver.find_elements(By.CSS_SELECTOR, "#samples .thumbnail-item")[1].click()
        wait_status("Sample")
        assert driver.execute_script(_VISIBLE_BADGES) == []

        # On a phone, Restore is above the fold; the result and the errors read the same.
        open_page(420, 900)
        bottom = driver.execute_script(
            "return document.querySelector('#restore-button').getBoundingClientRect().bottom;")
        assert bottom <= 900, f"Restore ends at {bottom} px, below the 900 px screen"
        screenshot("first_load_phone")
        restore_and_wait()
        driver.find_element(By.CSS_SELECTOR, "#status a[href='#comparison']").click()  # "see the result"
        wait.until(lambda _: driver.execute_script(
            "const box = document.querySelector('#comparison').getBoundingClientRect();"
            "return box.top >= 0 && box.top < window.innerHeight;"))
        screenshot("result_phone")
        upload(next(iter(_bad_files(tmp_path))))
        wait_status("⚠ Refused")
        driver.execute_script("window.scrollTo(0, 0);")
        screenshot("error_phone")
    finally:
        driver.quit()
