"""`sana-restore app` served for real: launched in a subprocess on 127.0.0.1 with the bundled restorer, driven through
Gradio's own client (`gradio_client`) and through a headless Chromium (selenium with Debian's chromium-driver).

Needs the app extra (gradio, gradio_client; in the test extra). The browser test also needs selenium and Debian's
`chromium` and `chromium-driver` (`.ci/run` installs them with apt-get); where they are missing it is skipped with
that reason. Set SANA_RESTORE_APP_SCREENSHOT=path to keep the browser's screenshot (README's comes from it).
"""

import concurrent.futures
import os
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

MAX_SIDE = 256
MAX_FILE_SIZE = "150kb"
CHROMEDRIVER = "/usr/bin/chromedriver"
CHROMIUM = "/usr/bin/chromium"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The app on a free port; yields its URL. The server's log is shown if it fails to start."""
    port = _free_port()
    log_path = tmp_path_factory.mktemp("app") / "server.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
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


def _restore(client, path, **kwargs):
    return client.predict(image=gradio_client.handle_file(path), api_name="/restore", **kwargs)


def test_restore_an_upload(client, tmp_path):
    path = _photo_file(tmp_path)
    comparison, download, scores_text, details = _restore(client, path)
    with Image.open(download) as restored:
        assert restored.format == "PNG" and restored.size == (96, 64)
    assert len(comparison) == 2
    assert details["scores"] is None and "simulate a degradation" in scores_text
    assert details["settings"]["num_inference_steps"] == 1  # the bundled model's recorded default


def test_restore_with_a_simulated_degradation_returns_psnr(client, tmp_path):
    path = _photo_file(tmp_path, seed=1)
    _, download, scores_text, details = _restore(client, path, degradation="Gaussian noise", level=25, seed=5)
    scores = details["scores"]
    assert details["settings"]["simulated_degradation"] == "gaussian_noise:25"
    with Image.open(download) as restored, Image.open(path) as clean:
        mse = np.mean((np.asarray(restored.convert("RGB"), float) - np.asarray(clean.convert("RGB"), float)) ** 2)
    assert scores["restored"]["psnr"] == pytest.approx(10 * np.log10(255.0**2 / mse), abs=0.01)
    assert f"{scores['restored']['psnr']:.2f}" in scores_text and "PSNR" in scores_text


def test_oversized_image_is_refused_with_its_message(client, tmp_path):
    path = _photo_file(tmp_path, width=MAX_SIDE + 40, height=32)
    with pytest.raises(gradio_client.exceptions.AppError,
                       match=rf"{MAX_SIDE + 40}x32 px; this app accepts at most {MAX_SIDE} px per side"):
        _restore(client, path)
    # the next request is served normally
    assert _restore(client, _photo_file(tmp_path, seed=2))[1]


def test_upload_above_the_file_size_limit_is_refused(client, tmp_path):
    noise = np.random.default_rng(0).integers(0, 256, (MAX_SIDE, MAX_SIDE, 3), dtype=np.uint8)
    path = str(tmp_path / "noise.png")
    Image.fromarray(noise).save(path)
    assert os.path.getsize(path) > 150_000  # incompressible: about 197 kB
    with pytest.raises(Exception, match="exceeds the maximum file size of 153600 bytes"):  # 150 kB = 150 * 1024
        _restore(client, path)


def test_invalid_setting_is_refused_with_the_pipelines_message(client, tmp_path):
    with pytest.raises(gradio_client.exceptions.AppError, match="`tile_size` must be"):
        _restore(client, _photo_file(tmp_path), tile_size="33")


def test_two_concurrent_requests_are_both_answered(server, tmp_path):
    paths = [_photo_file(tmp_path, seed=seed) for seed in (3, 4)]
    clients = [gradio_client.Client(server, verbose=False) for _ in paths]
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(_restore, c, p, degradation="JPEG compression", level=20) for c, p in zip(clients, paths)]
        results = [future.result(timeout=300) for future in futures]
    for result in results:
        assert result[3]["scores"]["restored"]["psnr"] > 0
        with Image.open(result[1]) as restored:
            assert restored.size == (96, 64)


def test_stop_cancels_a_running_request_which_returns_nothing(server, tmp_path):
    client = gradio_client.Client(server, verbose=False)
    job = client.submit(image=gradio_client.handle_file(_photo_file(tmp_path, 128, 128, seed=6)),
                        num_inference_steps=40, fidelity=0.0, api_name="/restore")
    deadline = time.monotonic() + 120
    while not job.status().progress_data:  # wait until it is denoising (progress is reported per step)
        assert not job.done(), "the request ended before it could be cancelled"
        assert time.monotonic() < deadline, "no progress was reported"
        time.sleep(0.02)
    assert job.status().progress_data[0].unit == "steps"
    client.predict(api_name="/cancel")  # what the Stop button calls
    outputs = job.result(timeout=120)
    # nothing is returned: every output is left as it was (Gradio's "skip" update), no image, no file
    assert all(isinstance(output, dict) and set(output) == {"__type__"} for output in outputs), outputs
    assert _restore(client, _photo_file(tmp_path, seed=8))[1]  # the next request is served


def _browser_missing() -> str:
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install selenium)"
    for path in (CHROMEDRIVER, CHROMIUM):
        if not (os.path.isfile(path) or shutil.which(os.path.basename(path))):
            return f"{path} is missing: apt-get install chromium chromium-driver"
    return ""


@pytest.mark.skipif(bool(_browser_missing()), reason=_browser_missing() or "browser present")
def test_restore_in_a_real_browser(server, tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1100",
                     "--disable-gpu"):
        options.add_argument(argument)
    # a real photo (scikit-image's coffee, a crop): what a visitor would try
    from diffusers_restore.sample_photos import center_crop, load_photo

    width, height = 256, 192
    photo = str(tmp_path / "coffee.png")
    center_crop(load_photo("coffee"), 256).crop((0, 32, width, 32 + height)).save(photo)

    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)  # explicit driver: no download
    try:
        driver.get(server)
        wait = WebDriverWait(driver, 120)
        upload = wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#input-image input[type=file]")))
        upload.send_keys(photo)
        wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#input-image img")))
        # simulate Gaussian noise on it, so the page scores the result against the clean photo
        driver.find_element(By.CSS_SELECTOR, "#degradation input").click()
        wait.until(ec.element_to_be_clickable((By.XPATH, "//li[contains(., 'Gaussian noise')]"))).click()
        wait.until(lambda driver: driver.find_element(By.CSS_SELECTOR, "#degradation input").get_attribute("value")
                   == "Gaussian noise")
        driver.find_element(By.CSS_SELECTOR, "#restore-button").click()

        def result_sizes(driver):
            sizes = driver.execute_script(
                "return Array.from(document.querySelectorAll('#comparison img'))"
                ".filter(img => img.complete && img.naturalWidth > 0)"
                ".map(img => [img.naturalWidth, img.naturalHeight]);")
            return sizes if len(sizes) >= 2 else False

        try:
            sizes = wait.until(result_sizes)
        except Exception:
            driver.save_screenshot(str(tmp_path / "failed.png"))
            pytest.fail(f"no result appeared; page text:\n{driver.find_element(By.TAG_NAME, 'body').text[:2000]}")
        assert all(tuple(size) == (width, height) for size in sizes), sizes
        wait.until(ec.text_to_be_present_in_element((By.CSS_SELECTOR, "#scores"), "PSNR"))
        assert "gaussian_noise:25" in driver.find_element(By.CSS_SELECTOR, "#scores").text
        wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#download a")))
        screenshot = tmp_path / "app.png"
        driver.save_screenshot(str(screenshot))
        with Image.open(screenshot) as shot:
            assert shot.size[0] > 0
            keep = os.environ.get("SANA_RESTORE_APP_SCREENSHOT")
            if keep:
                small = shot.convert("RGB").resize((shot.width * 3 // 4, shot.height * 3 // 4), Image.Resampling.LANCZOS)
                small.quantize(colors=128).save(keep, optimize=True)
    finally:
        driver.quit()
