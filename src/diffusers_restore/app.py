"""``sana-restore app``: a Gradio web demo of a :class:`SanaRestorationPipeline`.

A visitor uploads a photo (or picks a sample photo), may simulate a degradation on it (so that a clean photo can show
the model working, with PSNR / SSIM against that clean photo), and gets a before / after slider and a full-resolution
PNG to download. The sampling controls start at the model's own defaults (``pipe.sampling_defaults``).

Two layers, so that the behaviour is testable without a browser:

* :class:`RestorationApp` holds one pipeline and does the work: checks (image side, upscale, the pipeline's own
  argument checks), the simulated degradation, one pipeline call at a time (a lock per model copy), progress per
  denoising step, cancellation (a cancelled call returns ``None``: the pipeline's ``interrupt`` still decodes a
  half-denoised latent, which is discarded), metrics and the PNG file.
* :func:`build_demo` lays it out as ``gradio.Blocks``; :func:`launch` loads the model once and serves it, with
  Gradio's queue limited to one call at a time.

Gradio is an optional extra: ``pip install "diffusers-restore[app]"``. Nothing here needs the network: analytics are
off, the theme uses the system's fonts, and server-side rendering (which needs Node) is off.
"""

import logging
import os
import tempfile
import threading
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from PIL import Image

__all__ = [
    "DEFAULT_MAX_FILE_SIZE",
    "DEFAULT_MAX_IMAGE_SIDE",
    "DEGRADATION_CHOICES",
    "AppRequestError",
    "RestorationApp",
    "RestorationResult",
    "build_demo",
    "degradation_spec",
    "launch",
    "parse_tile_size",
    "sample_photo_files",
]

logger = logging.getLogger(__name__)

DEFAULT_MAX_IMAGE_SIDE = 2048
"""Longest side, in pixels, of an input image and of the restored output that the app accepts by default."""

DEFAULT_MAX_FILE_SIZE = "20mb"
"""Largest upload the app's server accepts by default (Gradio's ``max_file_size``)."""

NO_DEGRADATION = "none (restore the photo as it is)"


@dataclass(frozen=True)
class DegradationChoice:
    """One entry of the "simulate a degradation" menu: a degradation spec (see
    ``diffusers_restore.data.degradations.parse_degradation_spec``) with ``{level}`` filled from the level slider."""

    spec: str
    level_label: str = ""
    minimum: float = 0
    maximum: float = 0
    step: float = 1
    default: float = 0

    @property
    def has_level(self) -> bool:
        return "{level}" in self.spec


DEGRADATION_CHOICES: dict[str, DegradationChoice | None] = {
    NO_DEGRADATION: None,
    "Gaussian noise": DegradationChoice("gaussian_noise:{level}", "noise sigma (0-255 scale)", 5, 75, 1, 25),
    "JPEG compression": DegradationChoice("jpeg:{level}", "JPEG quality (lower = worse)", 5, 95, 1, 20),
    "Gaussian blur": DegradationChoice("gaussian_blur:{level}", "blur kernel size (px, odd)", 3, 21, 2, 7),
    "Downscale then upscale": DegradationChoice("downscale:{level}", "downscale factor", 1.5, 4, 0.5, 2),
    "Real-ESRGAN (blur, resize, noise, JPEG)": DegradationChoice("realesrgan"),
    "Real-ESRGAN light": DegradationChoice("realesrgan_light"),
}
"""The degradations a visitor can simulate, by menu label."""


def degradation_spec(choice: str, level: float | None = None) -> str | None:
    """The degradation spec for a menu `choice` at `level` (``None`` for no degradation).

    Raises:
        ValueError: an unknown choice, or a level the degradation refuses (the degradation's own message).
    """
    from .data.degradations import parse_degradation_spec

    if choice not in DEGRADATION_CHOICES:
        raise ValueError(f"unknown degradation {choice!r}; choose one of: {', '.join(DEGRADATION_CHOICES)}.")
    entry = DEGRADATION_CHOICES[choice]
    if entry is None:
        return None
    if not entry.has_level:
        return entry.spec
    if level is None:
        level = entry.default
    value = int(level) if float(level).is_integer() else float(level)
    spec = entry.spec.format(level=value)
    parse_degradation_spec(spec)  # the degradation's own range checks
    return spec


class AppRequestError(ValueError):
    """A request the app refuses (bad image, bad setting): its message is shown to the visitor as it is."""


@dataclass
class RestorationResult:
    """What one restore request returns."""

    input_image: "Image.Image"
    """The image the pipeline restored: the upload, or its simulated degradation."""
    restored: "Image.Image"
    """The restored image at full resolution."""
    output_path: str
    """The restored image as a PNG file (for download)."""
    scores: "dict[str, dict[str, float]] | None"
    """PSNR (dB) and SSIM of ``{"degraded": ..., "restored": ...}`` against the clean upload, when a degradation was
    simulated and the output has the upload's size; ``None`` otherwise."""
    settings: dict[str, Any]
    """The pipeline arguments used (the model's defaults merged with the visitor's settings)."""


class RestorationApp:
    """The app's work, independent of Gradio: one pipeline, called once at a time.

    Args:
        pipe: a loaded :class:`SanaRestorationPipeline`.
        model_name: how the model is named in the page.
        max_image_side: the longest side in pixels accepted for the input and for the output.
        output_dir: where the restored PNGs are written (a new temporary folder by default).
        keep_outputs: how many restored PNGs the output folder keeps (the oldest are removed first).
    """

    def __init__(self, pipe, model_name: str = "", max_image_side: int = DEFAULT_MAX_IMAGE_SIDE,
                 output_dir: str | None = None, keep_outputs: int = 64) -> None:
        if not isinstance(max_image_side, int) or isinstance(max_image_side, bool) or max_image_side < 1:
            raise ValueError(f"max_image_side must be a positive integer, got {max_image_side!r}.")
        self.pipe = pipe
        self.model_name = model_name
        self.max_image_side = max_image_side
        if not isinstance(keep_outputs, int) or keep_outputs < 1:
            raise ValueError(f"keep_outputs must be a positive integer, got {keep_outputs!r}.")
        self.keep_outputs = keep_outputs
        self.output_dir = output_dir or tempfile.mkdtemp(prefix="sana-restore-app-")
        os.makedirs(self.output_dir, exist_ok=True)
        self._pipeline_lock = threading.Lock()
        self._cancel_lock = threading.Lock()
        self._cancel_events: dict[str, threading.Event] = {}

    # ------------------------------------------------------------------------------------------- defaults

    @property
    def sampling_defaults(self) -> dict[str, Any]:
        """The model's own sampling defaults (what a plain ``pipe(image)`` uses)."""
        return dict(self.pipe.sampling_defaults)

    @property
    def control_defaults(self) -> dict[str, Any]:
        """The values the page's controls start at: the model's sampling defaults, with `restoration_guidance` left
        at `None` shown as the scheduler's configured strength (what `None` means) and the call's own defaults for
        the rest. A control left at its start value is passed as `None`, so the model's own default applies."""
        defaults = self.sampling_defaults
        tau = defaults.get("restoration_guidance")
        if tau is None:
            tau = float(getattr(self.pipe.scheduler, "config", {}).get("restoration_guidance_tau", 0.0) or 0.0)
        return {
            "num_inference_steps": int(defaults.get("num_inference_steps") or 1),
            "guidance_scale": float(defaults.get("guidance_scale") or 1.0),
            "restoration_guidance": float(tau),
            "strength": float(defaults.get("strength") or 1.0),
            "fidelity": float(defaults.get("fidelity") or 0.0),
            "upscale": 1.0,
        }

    def describe_model(self) -> str:
        """One line naming the model and the call it records as its defaults."""
        defaults = self.sampling_defaults
        steps, guidance = defaults.get("num_inference_steps"), defaults.get("guidance_scale")
        return (f"Model: `{self.model_name or 'SanaRestorationPipeline'}`; its recorded defaults: {steps} step(s), "
                f"guidance scale {guidance}.")

    # ----------------------------------------------------------------------------------------- cancelling

    def cancel(self, session: str) -> bool:
        """Ask the running request of `session` to stop at its next denoising step. Returns whether one was
        running."""
        with self._cancel_lock:
            event = self._cancel_events.get(session)
        if event is None:
            return False
        event.set()
        return True

    def _register(self, session: str) -> threading.Event:
        event = threading.Event()
        with self._cancel_lock:
            self._cancel_events[session] = event
        return event

    def _unregister(self, session: str, event: threading.Event) -> None:
        with self._cancel_lock:
            if self._cancel_events.get(session) is event:
                del self._cancel_events[session]

    # -------------------------------------------------------------------------------------------- checks

    def _check_image(self, image, what: str = "image") -> None:
        from PIL import Image

        if image is None:
            raise AppRequestError("no image: upload a photo or pick a sample photo first.")
        if not isinstance(image, Image.Image):
            raise AppRequestError(f"the {what} is not an image (got {type(image).__name__}).")
        width, height = image.size
        if max(width, height) > self.max_image_side:
            raise AppRequestError(
                f"the {what} is {width}x{height} px; this app accepts at most {self.max_image_side} px per side "
                "(the server's --max-image-side). Downscale or crop it first."
            )

    def call_arguments(self, prompt: str | None = None, num_inference_steps: int | None = None,
                       guidance_scale: float | None = None, restoration_guidance: float | None = None,
                       strength: float | None = None, fidelity: float | None = None, color_fix: str | None = "wavelet",
                       upscale: float | None = None, tile_size: int | None = None) -> dict[str, Any]:
        """The pipeline arguments for these settings, checked by the pipeline's own :meth:`check_inputs`.
        A setting that is ``None`` or equal to its :attr:`control_defaults` value is left out (the model's default).

        Raises:
            AppRequestError: a setting the pipeline refuses, with the pipeline's message.
        """
        kwargs: dict[str, Any] = {}
        if prompt:
            kwargs["prompt"] = prompt
        start = self.control_defaults
        for name, value, kind in (("num_inference_steps", num_inference_steps, int),
                                  ("guidance_scale", guidance_scale, float),
                                  ("restoration_guidance", restoration_guidance, float),
                                  ("strength", strength, float), ("fidelity", fidelity, float),
                                  ("upscale", upscale, float), ("tile_size", tile_size, int)):
            if value is None or (name in start and value == start[name]):
                continue
            if kind is int and float(value).is_integer():
                value = int(value)
            kwargs[name] = kind(value) if kind is float else value
        kwargs["color_fix"] = None if color_fix in (None, "none") else color_fix
        try:
            self.pipe.check_inputs(**{**kwargs, **self.pipe.resolve_sampling_arguments(**kwargs)})
        except ValueError as error:
            raise AppRequestError(str(error)) from error
        return kwargs

    # ------------------------------------------------------------------------------------------ restoring

    def restore(
        self,
        image: "Image.Image",
        degradation: str = NO_DEGRADATION,
        level: float | None = None,
        seed: int = 0,
        session: str = "",
        on_step: Callable[[int, int], None] | None = None,
        **settings: Any,
    ) -> "RestorationResult | None":
        """Restore `image` (after simulating `degradation` on it when one is chosen).

        Args:
            image: the uploaded photo (any PIL mode).
            degradation, level: a :data:`DEGRADATION_CHOICES` label and its level.
            seed: seeds the simulated degradation and the pipeline's generator.
            session: the visitor's session id; :meth:`cancel` with it stops this request.
            on_step: called as ``on_step(step, total)`` after each denoising step.
            **settings: :meth:`call_arguments`'s keyword arguments.

        Returns:
            The result, or ``None`` when the request was cancelled (its half-denoised output is discarded).

        Raises:
            AppRequestError: the image or a setting is refused (the message says which and why).
        """
        import numpy as np
        import torch

        from .data.degradations import apply_degradation_spec

        self._check_image(image)
        try:
            spec = degradation_spec(degradation, level)
        except ValueError as error:
            raise AppRequestError(f"degradation: {error}") from error
        kwargs = self.call_arguments(**settings)
        upscale = kwargs.get("upscale", 1.0)
        out_width, out_height = round(image.width * upscale), round(image.height * upscale)
        if max(out_width, out_height) > self.max_image_side:
            raise AppRequestError(
                f"upscale {upscale:g} would make a {out_width}x{out_height} px image; this app accepts at most "
                f"{self.max_image_side} px per side (the server's --max-image-side). Lower the upscale factor."
            )
        seed = int(seed or 0)
        clean = image
        degraded = image
        if spec is not None:
            degraded, _ = apply_degradation_spec(image, spec, np.random.default_rng(seed))

        cancelled = self._register(session)
        total_steps: list[int] = []

        def step_end(pipe, step: int, timestep, callback_kwargs: dict) -> dict:
            if cancelled.is_set():
                pipe._interrupt = True  # diffusers' convention: the remaining steps are skipped
            if not total_steps:
                total_steps.append(int(pipe.num_timesteps))
            if on_step is not None:
                on_step(step + 1, total_steps[0])
            return {}

        try:
            with self._pipeline_lock:  # one call at a time on this model copy
                if cancelled.is_set():
                    return None
                output = self.pipe(degraded, generator=torch.Generator().manual_seed(seed),
                                   callback_on_step_end=step_end, **kwargs)
                interrupted = bool(self.pipe.interrupt)
        finally:
            self._unregister(session, cancelled)
        if interrupted or cancelled.is_set():
            logger.info("request of session %s cancelled: its output is discarded", session or "-")
            return None
        restored = output.images[0]

        scores = None
        if spec is not None and restored.size == clean.size:
            scores = self._scores(clean, degraded, restored)
        path = os.path.join(self.output_dir, f"restored-{uuid.uuid4().hex[:12]}.png")
        from .image_io import save_image

        self._prune_outputs()
        save_image(restored, path)
        used = {**self.sampling_defaults, **kwargs}
        if spec is not None:
            used["simulated_degradation"] = spec
        return RestorationResult(degraded, restored, path, scores, used)

    def _prune_outputs(self) -> None:
        """Keep the output folder bounded on a long-running server: remove all but the newest `keep_outputs - 1`
        restored PNGs before a new one is written (Gradio has copied older ones into its own cache)."""
        with self._cancel_lock:
            names = [name for name in os.listdir(self.output_dir)
                     if name.startswith("restored-") and name.endswith(".png")]
            if len(names) < self.keep_outputs:
                return
            paths = sorted((os.path.join(self.output_dir, name) for name in names), key=os.path.getmtime)
            for stale in paths[: len(paths) - self.keep_outputs + 1]:
                try:
                    os.remove(stale)
                except FileNotFoundError:
                    pass

    @staticmethod
    def _scores(clean, degraded, restored) -> dict[str, dict[str, float]]:
        from .image_io import to_rgb
        from .metrics import compute_metrics, to_tensor01

        reference = to_tensor01(to_rgb(clean))
        scores = {}
        for name, candidate in (("degraded", degraded), ("restored", restored)):
            values = compute_metrics(to_tensor01(to_rgb(candidate)), reference, metrics=("psnr", "ssim"))
            scores[name] = {"psnr": round(float(values["psnr"]), 2), "ssim": round(float(values["ssim"]), 4)}
        return scores


# ------------------------------------------------------------------------------------------------ Gradio UI


def _import_gradio():
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    try:
        import gradio as gr
    except ImportError as error:
        raise ImportError(
            "the web app needs Gradio: pip install \"diffusers-restore[app]\" (or gradio>=6)."
        ) from error
    return gr


def parse_tile_size(text: str | int | None) -> int | None:
    """The tile size field: ``auto`` (or empty) is ``None`` (automatic tiling), otherwise a whole number of pixels.

    Raises:
        AppRequestError: anything else.
    """
    if text is None or str(text).strip().lower() in ("", "auto"):
        return None
    try:
        return int(str(text).strip())
    except ValueError:
        raise AppRequestError(f"tile size must be 'auto' or a whole number of pixels, got {text!r}.") from None


def _scores_markdown(scores: dict[str, dict[str, float]] | None, spec: str | None) -> str:
    if scores is None:
        if spec is None:
            return "No clean reference: simulate a degradation to see PSNR / SSIM."
        return "No scores: the output's size differs from the clean photo's (upscale > 1)."
    rows = "\n".join(f"| {name} | {values['psnr']:.2f} | {values['ssim']:.4f} |" for name, values in scores.items())
    return (f"Against the clean photo (simulated `{spec}`):\n\n| | PSNR (dB) | SSIM |\n|---|---|---|\n{rows}")


def sample_photo_files(folder: str) -> list[str]:
    """The package's sample photos (scikit-image's, see :mod:`diffusers_restore.sample_photos`) written as PNGs
    into `folder`; an empty list when scikit-image is not installed."""
    from .image_io import save_image
    from .sample_photos import TRAIN_PHOTOS, VALIDATION_PHOTOS, load_photo

    files = []
    for name in VALIDATION_PHOTOS + TRAIN_PHOTOS:
        path = os.path.join(folder, f"{name}.png")
        if not os.path.isfile(path):
            try:
                photo = load_photo(name)
            except RuntimeError:  # scikit-image is missing
                return []
            save_image(photo, path)
        files.append(path)
    return files


def build_demo(app: RestorationApp, examples: list[str] | None = None):
    """The Gradio page for `app` (a ``gradio.Blocks``; call ``.queue(...)`` and ``.launch(...)``, or use
    :func:`launch`).

    The restore event is exposed to API clients as ``/restore`` (keyword arguments named as the function's
    parameters below), and ``/cancel`` stops the caller's running request.
    """
    gr = _import_gradio()
    start = app.control_defaults

    def restore(image, degradation, level, prompt, num_inference_steps, guidance_scale, restoration_guidance,
                strength, fidelity, color_fix, upscale, seed, tile_size, request: gr.Request,
                progress=gr.Progress()):
        session = getattr(request, "session_hash", None) or ""
        spec = None
        try:
            spec = degradation_spec(degradation, level)
            result = app.restore(
                image, degradation, level, seed=seed, session=session,
                on_step=lambda step, total: progress((step, total), desc="denoising"),
                prompt=prompt, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                restoration_guidance=restoration_guidance, strength=strength, fidelity=fidelity,
                color_fix=color_fix, upscale=upscale, tile_size=parse_tile_size(tile_size),
            )
        except (AppRequestError, ValueError) as error:
            raise gr.Error(str(error), print_exception=False) from None
        except Exception as error:  # noqa: BLE001 - a failing request must not show a stack trace or stop the app
            logger.exception("restore request failed")
            raise gr.Error(f"the restoration failed: {type(error).__name__}: {error}", print_exception=False) from None
        if result is None:  # cancelled: nothing is returned
            return gr.skip(), gr.skip(), gr.skip(), gr.skip()
        before = result.input_image
        if before.size != result.restored.size:  # upscaled: show the input at the output's size in the slider
            from PIL import Image

            before = before.resize(result.restored.size, Image.Resampling.BICUBIC)
        details = {"settings": result.settings, "scores": result.scores}
        return (before, result.restored), result.output_path, _scores_markdown(result.scores, spec), details

    def cancel(request: gr.Request):
        app.cancel(getattr(request, "session_hash", None) or "")

    def level_control(degradation):
        entry = DEGRADATION_CHOICES.get(degradation)
        if entry is None or not entry.has_level:
            return gr.Slider(visible=False)
        return gr.Slider(minimum=entry.minimum, maximum=entry.maximum, step=entry.step, value=entry.default,
                         label=entry.level_label, visible=True)

    noise = DEGRADATION_CHOICES["Gaussian noise"]
    with gr.Blocks(title="SANA restoration", analytics_enabled=False, delete_cache=(3600, 3600)) as demo:
        gr.Markdown("# Image restoration with SANA\nUpload a degraded photo, or a clean one and simulate a "
                    "degradation, then press **Restore**. " + app.describe_model())
        with gr.Row():
            with gr.Column():
                image = gr.Image(label="Photo", type="pil", image_mode=None, sources=["upload", "clipboard"],
                                 elem_id="input-image")
                if examples:
                    gr.Examples(examples=[[path] for path in examples], inputs=[image], label="Sample photos")
                degradation = gr.Dropdown(list(DEGRADATION_CHOICES), value=NO_DEGRADATION,
                                          label="Simulate a degradation (for a clean photo)", elem_id="degradation")
                level = gr.Slider(minimum=noise.minimum, maximum=noise.maximum, step=noise.step, value=noise.default,
                                  label=noise.level_label, visible=False)
                with gr.Accordion("Advanced", open=False):
                    prompt = gr.Textbox(label="Prompt", value="", placeholder="the model's default (empty)")
                    steps = gr.Slider(1, 50, step=1, value=start["num_inference_steps"],
                                      label="Steps (num_inference_steps)")
                    guidance = gr.Slider(1.0, 10.0, step=0.1, value=start["guidance_scale"],
                                         label="Guidance scale (1 = no classifier-free guidance)")
                    restoration_guidance = gr.Slider(0.0, 10.0, step=0.1,
                                                     value=start["restoration_guidance"],
                                                     label="Restoration guidance (0 = off)")
                    strength = gr.Slider(0.05, 1.0, step=0.05, value=start["strength"],
                                         label="Strength (fraction of the noise schedule)")
                    fidelity = gr.Slider(0.0, 1.0, step=0.05, value=start["fidelity"],
                                         label="Fidelity (input detail put back)")
                    color_fix = gr.Radio(["wavelet", "adain", "none"], value="wavelet", label="Colour fix")
                    upscale = gr.Slider(1.0, 4.0, step=0.5, value=start["upscale"], label="Upscale")
                    seed = gr.Number(value=0, precision=0, label="Seed")
                    tile_size = gr.Textbox(value="auto",
                                           label=f"Tile size (px, a multiple of {app.pipe.size_multiple}; auto = "
                                                 "the model's size, 0 = never tile)")
                with gr.Row():
                    run_button = gr.Button("Restore", variant="primary", elem_id="restore-button")
                    stop_button = gr.Button("Stop", variant="stop")
            with gr.Column():
                comparison = gr.ImageSlider(label="Before / after", type="pil", format="png", elem_id="comparison")
                download = gr.File(label="Restored image (PNG, full resolution)", elem_id="download")
                scores = gr.Markdown("Simulate a degradation to see PSNR / SSIM against the clean photo.",
                                     elem_id="scores")
                with gr.Accordion("Details", open=False):
                    used = gr.JSON(label="Pipeline arguments used and scores")

        degradation.change(level_control, inputs=degradation, outputs=level, api_visibility="private")
        run_event = run_button.click(
            restore,
            inputs=[image, degradation, level, prompt, steps, guidance, restoration_guidance, strength, fidelity,
                    color_fix, upscale, seed, tile_size],
            outputs=[comparison, download, scores, used],
            api_name="restore",
            concurrency_limit=1,
            concurrency_id="pipeline",
        )
        stop_button.click(cancel, inputs=None, outputs=None, cancels=[run_event], queue=False, api_name="cancel")
    return demo


def launch(model: str = "bundled", host: str = "127.0.0.1", port: int = 7860, share: bool = False,
           max_image_side: int = DEFAULT_MAX_IMAGE_SIDE, max_file_size: str | int = DEFAULT_MAX_FILE_SIZE,
           device: str | None = None, dtype=None, revision: str | None = None, max_queue_size: int = 32,
           prevent_thread_lock: bool = False):
    """Load `model` once and serve the app on `host`:`port` (blocks until stopped unless `prevent_thread_lock`).

    Args:
        model: ``bundled``, a pipeline folder or a Hub repo id.
        share: ask Gradio for a public ``*.gradio.live`` link (needs the network; the app keeps serving locally
            when it cannot get one).
        max_image_side: longest accepted side in pixels (input and output).
        max_file_size: largest upload (``"20mb"``, or bytes).
        max_queue_size: requests waiting beyond this are refused by Gradio's queue.

    Returns:
        The running ``gradio.Blocks``.
    """
    gr = _import_gradio()
    from .cli_common import load_pipeline, resolve_model

    source = resolve_model(model)
    pipe = load_pipeline(source, dtype=dtype, device=device, revision=revision)
    pipe.set_progress_bar_config(disable=True)
    app = RestorationApp(pipe, model_name=model, max_image_side=max_image_side)
    examples = sample_photo_files(tempfile.mkdtemp(prefix="sana-restore-samples-"))
    demo = build_demo(app, examples)
    demo.queue(default_concurrency_limit=1, max_size=max_queue_size)
    system_fonts = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                                     font_mono=["ui-monospace", "monospace"])
    launch_kwargs = dict(server_name=host, server_port=port, max_file_size=max_file_size, theme=system_fonts,
                         ssr_mode=False, show_error=True, prevent_thread_lock=True, quiet=False)
    try:
        demo.launch(share=share, **launch_kwargs)
    except Exception as error:  # noqa: BLE001 - Gradio raises several kinds when its share servers are unreachable
        if not share:
            raise
        print(f"--share: could not create a public link ({type(error).__name__}: {error}); a share link needs "
              "network access to Gradio's share servers. Serving locally only.", flush=True)
        demo.close()
        demo.launch(share=False, **launch_kwargs)
    if share and not getattr(demo, "share_url", None):
        print("--share: no public link was created (a share link needs network access to Gradio's share servers); "
              f"the app is served locally at {demo.local_url}", flush=True)
    if not prevent_thread_lock:
        demo.block_thread()
    return demo
