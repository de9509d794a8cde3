"""``sana-restore app``: a Gradio web demo of a :class:`SanaRestorationPipeline`.

A visitor uploads a photo (or picks a sample photo), may simulate a degradation on it (so that a clean photo can show
the model working, with PSNR / SSIM against that clean photo), and gets a before / after slider and a full-resolution
PNG to download. The page opens ready to show what the model does: a sample photo loaded and a degradation the model
was trained on selected, with one line about the model from its own card.

Two layers, so that the behaviour is testable without a browser:

* :class:`RestorationApp` holds one pipeline and does the work: opening an upload with the package's own image reader
  and its messages, size checks, the settings checked by the pipeline, the simulated degradation, one pipeline call at
  a time (a lock per model copy), progress per stage and tile, cancelling, metrics and the PNG file. What it shows of
  the model (its card's description, the degradation to start with, the controls that do nothing for it) is read from
  the model's folder.
* :func:`build_demo` lays it out as ``gradio.Blocks``; :func:`launch` loads the model once and serves it, with
  Gradio's queue limited to one call at a time.

Progress comes from the pipeline's own progress bars (``DiffusionPipeline.progress_bar``, one tqdm bar per stage,
named by its ``desc``): while the app runs the pipeline, it wraps that method so that each bar's updates reach the
page, and so that a cancelled request stops at the next tile or step of any stage.

Gradio is an optional extra: ``pip install "diffusers-restore[app]"``. Nothing here needs the network: analytics are
off, the theme uses the system's fonts, and server-side rendering (which needs Node) is off.
"""

import logging
import os
import queue
import re
import shutil
import tempfile
import threading
import time
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
    "describe_model_card",
    "launch",
    "parse_tile_size",
    "read_model_card",
    "sample_photo_files",
    "trained_degradation",
]

logger = logging.getLogger(__name__)

DEFAULT_MAX_IMAGE_SIDE = 2048
"""Longest side, in pixels, of an input image and of the restored output that the app accepts by default."""

DEFAULT_MAX_FILE_SIZE = "20mb"
"""Largest upload the app's server accepts by default (Gradio's ``max_file_size``)."""

NO_DEGRADATION = "none (restore the photo as it is)"

MODEL_CARD = "README.md"
"""The model card's file name in a pipeline folder (as on the Hub)."""


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

    @property
    def name(self) -> str:
        """The degradation's name in a spec (``gaussian_noise`` for ``gaussian_noise:{level}``)."""
        return self.spec.split(":")[0]


DEGRADATION_CHOICES: dict[str, DegradationChoice | None] = {
    NO_DEGRADATION: None,
    "Gaussian noise": DegradationChoice("gaussian_noise:{level}", "Noise strength (sigma, 0-255 scale)", 5, 75, 1, 25),
    "JPEG compression": DegradationChoice("jpeg:{level}", "JPEG quality (lower = worse)", 5, 95, 1, 20),
    "Gaussian blur": DegradationChoice("gaussian_blur:{level}", "Blur size (px, odd)", 3, 21, 2, 7),
    "Downscale then upscale": DegradationChoice("downscale:{level}", "Downscale factor", 1.5, 4, 0.5, 2),
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


# ------------------------------------------------------------------------------------------- the model's card


def read_model_card(location: str) -> str | None:
    """The text of the model card (``README.md``) of a pipeline folder or Hub repo id; ``None`` when there is none
    (or the Hub cannot be reached)."""
    if not location:
        return None
    path = os.path.join(location, MODEL_CARD)
    if not os.path.isdir(location):
        try:
            from huggingface_hub import hf_hub_download

            path = hf_hub_download(location, MODEL_CARD)
        except Exception as error:  # noqa: BLE001 - offline, no card, private repo: the page says it has none
            logger.info("no model card for %s (%s)", location, type(error).__name__)
            return None
    try:
        with open(path, encoding="utf-8") as handle:
            return handle.read()
    except (OSError, UnicodeDecodeError):
        return None


def _card_body(card: str) -> str:
    """The card without its YAML front matter."""
    if card.startswith("---"):
        end = card.find("\n---", 3)
        if end != -1:
            return card[end + 4:]
    return card


def describe_model_card(card: str | None, limit: int = 300) -> str | None:
    """The model card's opening description as one line: its first paragraph of prose (after the front matter and
    the title), cut after the last whole sentence within `limit` characters. ``None`` when the card has none."""
    if not card:
        return None
    paragraph: list[str] = []
    for line in _card_body(card).splitlines():
        stripped = line.strip()
        if not stripped:
            if paragraph:
                break
            continue
        if stripped.startswith(("#", "<", "!", "|", "```")) and not paragraph:
            continue
        paragraph.append(stripped)
    text = " ".join(paragraph)
    if not text:
        return None
    if len(text) <= limit:
        return text
    cut = max(text.rfind(". ", 0, limit), text.rfind("; ", 0, limit))
    return text[: cut + 1] if cut > 0 else text[: limit].rsplit(" ", 1)[0] + "..."


_TRAINED_DEGRADATIONS = re.compile(r"Degradations: `([^`]+)`")


def trained_degradation(card: str | None) -> tuple[str, float] | None:
    """The menu choice and level of the first degradation a model was trained on, as its card records them (the
    ``Degradations: `spec|spec...``` line that ``examples/train_paired.py`` writes); ``None`` when the card records
    none that the menu offers. A spec without a level (``gaussian_noise``) gets the menu's default level."""
    match = _TRAINED_DEGRADATIONS.search(card or "")
    if not match:
        return None
    for spec in match.group(1).split("|"):
        name, _, level = spec.strip().partition(":")
        for choice, entry in DEGRADATION_CHOICES.items():
            if entry is None or entry.name != name:
                continue
            if not entry.has_level:
                return choice, 0.0
            try:
                value = float(level) if level else float(entry.default)
            except ValueError:
                value = float(entry.default)
            if not entry.minimum <= value <= entry.maximum:
                value = float(entry.default)
            return choice, value
    return None


# -------------------------------------------------------------------------------------------------- requests


class AppRequestError(ValueError):
    """A request the app refuses (bad image, bad setting): its message is shown to the visitor as it is."""


class _Cancelled(Exception):
    """Raised into the pipeline by its progress bar when the request was cancelled."""


@dataclass
class RestorationResult:
    """What one restore request returns."""

    input_image: "Image.Image"
    """The image the pipeline restored: the upload, or its simulated degradation."""
    restored: "Image.Image"
    """The restored image at full resolution."""
    output_path: str
    """The restored image as a PNG file (for download), named ``<input name>_restored.png``."""
    scores: "dict[str, dict[str, float]] | None"
    """PSNR (dB) and SSIM of ``{"degraded": ..., "restored": ...}`` against the clean upload, when a degradation was
    simulated and the output has the upload's size; ``None`` otherwise."""
    settings: dict[str, Any]
    """The pipeline arguments used (the model's defaults merged with the visitor's settings)."""


class _ReportingBar:
    """One of the pipeline's progress bars (a tqdm), whose updates are also reported as ``report(stage, done,
    total)``. `report` may raise to stop the pipeline (a cancelled request)."""

    def __init__(self, bar, stage: str, total: int | None, report: Callable[[str, int, int], None]) -> None:
        self._bar = bar
        self._stage = stage
        self._total = int(total or 0)
        self._done = 0
        self._report = report
        report(self._stage, 0, self._total)

    def update(self, n: int = 1):
        self._done += n
        self._report(self._stage, self._done, self._total)
        return self._bar.update(n)

    def set_description(self, desc: str | None = None, refresh: bool = True):
        self._stage = desc or self._stage
        return self._bar.set_description(desc, refresh)

    def __iter__(self):
        for item in self._bar:
            yield item
            self._done += 1
            self._report(self._stage, self._done, self._total)

    def __enter__(self):
        self._bar.__enter__()
        return self

    def __exit__(self, *exc_info):
        return self._bar.__exit__(*exc_info)

    def __getattr__(self, name: str):
        return getattr(self._bar, name)


def _output_stem(name: str | None) -> str:
    """A file-name stem for the output of an input named `name`: its stem, with anything but letters, digits, dots,
    dashes and underscores replaced."""
    stem = os.path.splitext(os.path.basename(name or ""))[0]
    stem = re.sub(r"[^\w.-]+", "_", stem).strip("._")[:80]
    return stem or "image"


class RestorationApp:
    """The app's work, independent of Gradio: one pipeline, called once at a time.

    Args:
        pipe: a loaded :class:`SanaRestorationPipeline`.
        model_name: how the model is named in the page.
        max_image_side: the longest side in pixels accepted for the input and for the output.
        output_dir: where the restored PNGs are written (a new temporary folder by default).
        keep_outputs: how many restored PNGs the output folder keeps (the oldest are removed first).
        model_card: the model card's text (default: read from the pipeline's folder, see :func:`read_model_card`).
    """

    def __init__(self, pipe, model_name: str = "", max_image_side: int = DEFAULT_MAX_IMAGE_SIDE,
                 output_dir: str | None = None, keep_outputs: int = 64, model_card: str | None = None) -> None:
        if not isinstance(max_image_side, int) or isinstance(max_image_side, bool) or max_image_side < 1:
            raise ValueError(f"max_image_side must be a positive integer, got {max_image_side!r}.")
        if not isinstance(keep_outputs, int) or keep_outputs < 1:
            raise ValueError(f"keep_outputs must be a positive integer, got {keep_outputs!r}.")
        self.pipe = pipe
        self.model_name = model_name
        self.max_image_side = max_image_side
        self.keep_outputs = keep_outputs
        self.output_dir = output_dir or tempfile.mkdtemp(prefix="sana-restore-app-")
        os.makedirs(self.output_dir, exist_ok=True)
        if model_card is None:
            model_card = read_model_card(getattr(pipe, "name_or_path", "") or "")
        self.model_card = model_card
        self._pipeline_lock = threading.Lock()
        self._cancel_lock = threading.Lock()
        self._cancel_events: dict[str, threading.Event] = {}

    # ----------------------------------------------------------------------------------- what the model is

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

    @property
    def min_image_side(self) -> int:
        """The shortest side in pixels the pipeline accepts: one latent pixel (the VAE's scale factor)."""
        return int(getattr(self.pipe, "vae_scale_factor", 1) or 1)

    @property
    def has_text_encoder(self) -> bool:
        return all(getattr(self.pipe, name, None) is not None for name in ("text_encoder", "tokenizer"))

    def describe_model(self) -> str:
        """One line naming the model, with its card's opening description (Markdown)."""
        name = str(self.model_name or getattr(self.pipe, "name_or_path", "") or type(self.pipe).__name__)
        if os.path.isdir(name):  # a folder by its name; a Hub repo id as it is
            name = os.path.basename(os.path.abspath(name))
        description = describe_model_card(self.model_card)
        if description is None:
            description = "Its folder has no model card (README.md) describing it."
        return f"**Model:** `{name}`. {description}"

    @property
    def sample_degradation(self) -> tuple[str, float | None]:
        """The degradation the page starts with, as ``(menu choice, level)``: the first one the model's card says it
        was trained on (see :func:`trained_degradation`), else none."""
        return trained_degradation(self.model_card) or (NO_DEGRADATION, None)

    def disabled_controls(self) -> dict[str, str]:
        """The settings that do nothing for this model, each with the reason shown next to it, decided from what the
        pipeline's folder holds: without a text encoder, prompts are ignored and classifier-free guidance (which
        needs the negative prompt encoded) is unavailable."""
        if self.has_text_encoder:
            return {}
        return {
            "prompt": "Unavailable: this model has no text encoder, so it reads no prompt (it runs on the empty one).",
            "guidance_scale": "Unavailable: this model has no text encoder to read the \"blurry, noisy, low quality\" "
                              "prompt that guidance pushes away from.",
        }

    # ----------------------------------------------------------------------------------------- cancelling

    def prepare(self, session: str) -> None:
        """Make a request of `session` cancellable before it starts (while it waits for its turn): :meth:`cancel`
        then stops it as soon as it starts, whatever :meth:`restore` it is."""
        self._register(session)

    def cancel(self, session: str) -> bool:
        """Ask the request of `session` (running, or prepared with :meth:`prepare`) to stop at its next tile or
        step. Returns whether there was one."""
        with self._cancel_lock:
            event = self._cancel_events.get(session)
        if event is None:
            return False
        event.set()
        return True

    def cancel_requested(self, session: str) -> bool:
        """Whether :meth:`cancel` was called for the request of `session` that has not ended yet."""
        with self._cancel_lock:
            event = self._cancel_events.get(session)
        return event is not None and event.is_set()

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
        if min(width, height) < self.min_image_side:
            raise AppRequestError(
                f"the {what} is {width}x{height} px; this model needs at least {self.min_image_side} px per side."
            )

    def open_image(self, path: str, name: str | None = None) -> "Image.Image":
        """Open an uploaded file with the package's image reader and check its size.

        Args:
            path: the file on this server.
            name: the file's name as the visitor knows it; messages name it, never `path`.

        Raises:
            AppRequestError: an empty file, a file that is not a readable image, or an image of a refused size.
        """
        from .image_io import ImageReadError, load_image

        name = os.path.basename(name or path)
        try:
            if os.path.getsize(path) == 0:
                raise AppRequestError(f"{name}: the file is empty (0 bytes).")
            image = load_image(path)
        except ImageReadError as error:
            raise AppRequestError(f"{name}: {error.problem}") from None
        except OSError:
            raise AppRequestError(f"{name}: the upload could not be read; upload it again.") from None
        self._check_image(image, what=f"image {name}")
        return image

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
        on_progress: Callable[[str, int, int], None] | None = None,
        input_name: str | None = None,
        **settings: Any,
    ) -> "RestorationResult | None":
        """Restore `image` (after simulating `degradation` on it when one is chosen).

        Args:
            image: the uploaded photo (any PIL mode).
            degradation, level: a :data:`DEGRADATION_CHOICES` label and its level.
            seed: seeds the simulated degradation and the pipeline's generator.
            session: the visitor's session id; :meth:`cancel` with it stops this request.
            on_progress: called as ``on_progress(stage, done, total)`` when each of the pipeline's progress bars
                starts (``done == 0``) and at each of its updates (tiles, or tiles x steps while denoising); `stage`
                is the bar's description.
            input_name: the upload's file name; the PNG is named ``<its stem>_restored.png``.
            **settings: :meth:`call_arguments`'s keyword arguments.

        Returns:
            The result, or ``None`` when the request was cancelled (nothing it computed is kept).

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

        with self._cancel_lock:
            cancelled = self._cancel_events.get(session)
        if cancelled is None:
            cancelled = self._register(session)

        def report(stage: str, done: int, total: int) -> None:
            if cancelled.is_set():
                raise _Cancelled
            if on_progress is not None:
                on_progress(stage, done, total)

        try:
            with self._pipeline_lock:  # one call at a time on this model copy
                if cancelled.is_set():
                    return None
                output = self._call_reporting(report, degraded, generator=torch.Generator().manual_seed(seed),
                                              **kwargs)
        except _Cancelled:
            logger.info("request of session %s cancelled", session or "-")
            return None
        finally:
            self._unregister(session, cancelled)
        restored = output.images[0]

        scores = None
        if spec is not None and restored.size == clean.size:
            scores = self._scores(clean, degraded, restored)
        from .image_io import save_image

        path = self._new_output_path(input_name)
        save_image(restored, path)
        used = {**self.sampling_defaults, **kwargs}
        if spec is not None:
            used["simulated_degradation"] = spec
        return RestorationResult(degraded, restored, path, scores, used)

    def _call_reporting(self, report: Callable[[str, int, int], None], image, **kwargs):
        """Call the pipeline with each progress bar it opens reporting to `report` (its `progress_bar` method is
        shadowed for the call; the lock keeps calls apart)."""
        pipe = self.pipe
        progress_bar = pipe.progress_bar

        def reporting_progress_bar(iterable=None, total=None, **options):
            bar = progress_bar(iterable=iterable, total=total, **options)
            if total is None and iterable is not None and hasattr(iterable, "__len__"):
                total = len(iterable)
            return _ReportingBar(bar, options.get("desc") or "denoising", total, report)

        pipe.progress_bar = reporting_progress_bar
        try:
            return pipe(image, **kwargs)
        finally:
            del pipe.progress_bar

    def _new_output_path(self, input_name: str | None) -> str:
        """``<output_dir>/<new folder>/<input stem>_restored.png``, after removing all but the newest
        `keep_outputs - 1` earlier outputs (Gradio has copied them into its own cache), so that a long-running
        server's folder stays bounded."""
        with self._cancel_lock:
            folders = sorted(name for name in os.listdir(self.output_dir) if name.startswith("request-"))
            for stale in folders[: max(0, len(folders) - self.keep_outputs + 1)]:
                shutil.rmtree(os.path.join(self.output_dir, stale), ignore_errors=True)
            # named by creation time, so that sorting the names puts the oldest first
            folder = tempfile.mkdtemp(prefix=f"request-{time.time_ns():020d}-", dir=self.output_dir)
        return os.path.join(folder, f"{_output_stem(input_name)}_restored.png")

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


def parse_tile_size(text: str | int | None, multiple: int = 1) -> int | None:
    """The tile size field: ``auto`` (or empty) is ``None`` (automatic tiling), ``0`` never splits the photo,
    otherwise a whole number of pixels that is a multiple of `multiple` (the pipeline's ``size_multiple``).

    Raises:
        AppRequestError: anything else, with the rule in plain words.
    """
    if text is None or str(text).strip().lower() in ("", "auto"):
        return None
    try:
        value = int(str(text).strip())
    except ValueError:
        value = -1
    if value < 0 or value % multiple:
        examples = f" (such as {8 * multiple} or {16 * multiple})" if multiple > 1 else ""
        raise AppRequestError(
            f"Tile size {str(text).strip()!r} is not allowed: write 'auto', 0 (never split the photo into tiles), "
            f"or a whole number of pixels that is a multiple of {multiple}{examples}."
        )
    return value


def _scores_markdown(scores: dict[str, dict[str, float]] | None, spec: str | None) -> str:
    if scores is None:
        if spec is None:
            return "No clean reference: simulate a degradation to see PSNR / SSIM."
        return "No scores: the output's size differs from the clean photo's (upscale > 1)."
    rows = "\n".join(f"| {name} | {values['psnr']:.2f} | {values['ssim']:.4f} |" for name, values in scores.items())
    return (f"Against the clean photo (simulated `{spec}`; higher is better):\n\n| | PSNR (dB) | SSIM |\n"
            f"|---|---|---|\n{rows}")


def progress_markdown(stage: str, done: int, total: int, elapsed: float) -> str:
    """The status line while a request runs: the stage, its tiles (or tiles x steps) done, a bar and the time."""
    if total > 0:
        filled = round(10 * min(done, total) / total)
        count = f" {done}/{total} {'▰' * filled}{'▱' * (10 - filled)}"
    else:
        count = f" {done}" if done else ""
    return f"**Restoring** · {stage}{count} · {elapsed:.0f} s"


CANCELLED = "**Cancelled**: nothing was restored."
STOPPING = "**Stopping** at the next tile or step…"


def sample_photo_files(folder: str, max_side: int | None = None) -> list[str]:
    """The package's sample photos (scikit-image's, see :mod:`diffusers_restore.sample_photos`) written as PNGs
    into `folder`, downscaled to fit `max_side` pixels per side when given; an empty list when scikit-image is not
    installed."""
    from PIL import Image

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
            if max_side is not None and max(photo.size) > max_side:
                photo.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
            save_image(photo, path)
        files.append(path)
    return files


APP_CSS = """
#restore-button { min-height: 3rem; font-size: 1.1rem; }
#stop-button { align-self: center; }
#status { min-height: 1.6rem; }
#status p { margin: 0.25rem 0; }
#header p { margin: 0.2rem 0; }
#samples .caption-label { font-size: 0.8rem; }
#download .empty { min-height: 0 !important; height: 5rem !important; }
#comparison .slider-wrap { position: relative; }
#comparison .slider-wrap::before, #comparison .slider-wrap::after {
  position: absolute; bottom: 0.5rem; z-index: 25; padding: 0.1rem 0.5rem; border-radius: 0.3rem;
  background: rgba(0, 0, 0, 0.6); color: #fff; font-size: 0.85rem; pointer-events: none;
}
#comparison .slider-wrap::before { content: "Before"; left: 0.5rem; }
#comparison .slider-wrap::after { content: "Restored"; right: 0.5rem; }
#samples .grid-container { grid-template-columns: repeat(var(--grid-cols), minmax(0, 1fr)) !important; }
@media (max-width: 640px) {
  #samples .grid-container { --grid-cols: 3 !important; }
  #samples, #samples .gallery-container, #samples .grid-wrap { height: auto !important; }
}
"""
"""The page's few style rules (passed to ``launch(css=...)``)."""


def _upload_path(payload) -> tuple[str | None, str | None]:
    """The server path and the visitor's file name of an image input's raw value (Gradio's file data)."""
    if payload is None:
        return None, None
    if isinstance(payload, str):
        return payload, os.path.basename(payload)
    path = payload.get("path")
    return path, payload.get("orig_name") or (os.path.basename(path) if path else None)


def build_demo(app: RestorationApp, samples: list[str] | None = None):
    """The Gradio page for `app` (a ``gradio.Blocks``; call ``.queue(...)`` and ``.launch(css=APP_CSS, ...)``, or use
    :func:`launch`).

    The restore event is exposed to API clients as ``/restore`` (keyword arguments named as the function's
    parameters below; it returns the slider pair, the PNG, the scores text, a ``{"settings", "scores"}`` dictionary
    and the status line), and ``/cancel`` stops the caller's running request.
    """
    gr = _import_gradio()
    from .image_io import to_rgb

    start = app.control_defaults
    disabled = app.disabled_controls()
    one_step = start["num_inference_steps"] == 1
    multiple = int(getattr(app.pipe, "size_multiple", 1) or 1)
    samples = samples or []

    def session_of(request) -> str:
        return getattr(request, "session_hash", None) or ""

    def opened(payload):
        path, name = _upload_path(payload)
        if path is None:
            raise AppRequestError("no image: upload a photo or pick a sample photo first.")
        return app.open_image(path, name), name

    def restore(image, degradation, level, prompt, num_inference_steps, guidance_scale, restoration_guidance,
                strength, fidelity, color_fix, upscale, seed, tile_size, request: gr.Request):
        session = session_of(request)
        started = time.monotonic()
        updates: queue.Queue = queue.Queue()
        outcome: dict[str, Any] = {}

        def work():
            try:
                picture, name = opened(image)
                outcome["result"] = app.restore(
                    picture, degradation, level, seed=seed, session=session, input_name=name,
                    on_progress=lambda *progress: updates.put(progress),
                    prompt=prompt, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                    restoration_guidance=restoration_guidance, strength=strength, fidelity=fidelity,
                    color_fix=color_fix, upscale=upscale, tile_size=parse_tile_size(tile_size, multiple),
                )
            except Exception as error:  # noqa: BLE001 - reported to the visitor below
                outcome["error"] = error
            finally:
                updates.put(None)

        threading.Thread(target=work, name=f"restore-{session}", daemon=True).start()
        progress = ("preparing", 0, 0)
        while True:
            try:
                update = updates.get(timeout=1.0)
            except queue.Empty:  # a long tile: the time still moves
                update = progress
            while update is not None and not updates.empty():  # only the latest counts
                update = updates.get_nowait()
            if update is None:
                break
            progress = update
            if app.cancel_requested(session):
                line = STOPPING
            else:
                line = progress_markdown(*progress, time.monotonic() - started)
            yield gr.skip(), gr.skip(), gr.skip(), gr.skip(), line

        elapsed = time.monotonic() - started
        error = outcome.get("error")
        if error is not None:
            if isinstance(error, (AppRequestError, ValueError)):
                message = str(error)
            else:
                logger.error("restore request failed", exc_info=error)
                message = f"the restoration failed: {type(error).__name__}: {error}"
            yield gr.skip(), gr.skip(), gr.skip(), gr.skip(), f"⚠ **Not restored**: {message}"
            raise gr.Error(message, print_exception=False)
        result = outcome["result"]
        if result is None:
            yield gr.skip(), gr.skip(), gr.skip(), gr.skip(), CANCELLED
            return
        before = result.input_image
        if before.size != result.restored.size:  # upscaled: show the input at the output's size in the slider
            from PIL import Image

            before = before.resize(result.restored.size, Image.Resampling.BICUBIC)
        if before.mode not in ("RGB", "RGBA"):  # e.g. a CMYK JPEG: shown (as PNG) in RGB
            before = to_rgb(before)
        spec = result.settings.get("simulated_degradation")
        details = {"settings": result.settings, "scores": result.scores}
        done = (f"**Done** in {elapsed:.1f} s: [see the result](#comparison), download "
                f"`{os.path.basename(result.output_path)}`.")
        yield (before, result.output_path), result.output_path, _scores_markdown(result.scores, spec), details, done

    def busy(request: gr.Request):
        app.prepare(session_of(request))
        return (gr.Button(value="Restoring…", interactive=False), gr.Button(interactive=True),
                "**Waiting** for the model…")

    def idle():
        return gr.Button(value="Restore", interactive=True), gr.Button(value="Stop", interactive=False)

    def cancel(request: gr.Request):
        app.cancel(session_of(request))

    def stopping():  # the request's own status line says "Stopping", then "Cancelled"
        return gr.Button(value="Stopping…", interactive=False)

    cleared = (None, None, "", None)

    def check_upload(payload):
        try:
            picture, name = opened(payload)
        except AppRequestError as error:
            return (None, *cleared, f"⚠ **Refused**: {error}")
        return (gr.skip(), *cleared, f"Ready: `{name}`, {picture.width}x{picture.height} px. Press **Restore**.")

    def pick_sample(event: gr.SelectData):
        path = samples[event.index]
        return (path, *cleared, f"Sample `{os.path.basename(path)}` loaded. Press **Restore**.")

    def level_control(degradation, value=None):
        entry = DEGRADATION_CHOICES.get(degradation)
        if entry is None or not entry.has_level:
            return gr.Slider(visible=False)
        return gr.Slider(minimum=entry.minimum, maximum=entry.maximum, step=entry.step,
                         value=entry.default if value is None else value, label=entry.level_label, visible=True)

    def step_dependent(steps):
        """Restoration guidance and strength act only when more than one step runs."""
        several = steps is not None and int(steps) > 1
        return (gr.Slider(interactive=several, info=restoration_guidance_info(several)),
                gr.Slider(interactive=several, info=strength_info(several)))

    def restoration_guidance_info(several: bool) -> str:
        if not several:
            return "Unavailable at 1 step (it acts between steps): raise Steps to use it."
        return ("Keeps early steps close to your photo: higher = more faithful, less invented detail. 0 = off.")

    def strength_info(several: bool) -> str:
        if not several:
            return "Unavailable at 1 step: raise Steps to use it."
        return "How much of the process runs: 1 starts from noise; lower starts from your photo and changes it less."

    def ready():
        """The page opens with the degradation the model was trained on (the API's default stays none)."""
        choice, value = app.sample_degradation
        return choice, level_control(choice, value)

    noise = DEGRADATION_CHOICES["Gaussian noise"]
    recorded_steps = start["num_inference_steps"]
    steps_note = (f"This model was made for {recorded_steps} step{'s' if recorded_steps > 1 else ''} (its recorded "
                  "default)"
                  + ("; more steps change its result, usually for the worse." if one_step else "."))

    with gr.Blocks(title="SANA restoration", analytics_enabled=False, delete_cache=(3600, 3600)) as demo:
        gr.Markdown("## Photo restoration\n" + app.describe_model(), elem_id="header")
        with gr.Row(equal_height=False):
            with gr.Column():
                image = gr.Image(label="Photo", type="filepath", image_mode=None, sources=["upload", "clipboard"],
                                 value=samples[0] if samples else None, height=300, elem_id="input-image")
                with gr.Row():
                    degradation = gr.Dropdown(
                        list(DEGRADATION_CHOICES), value=NO_DEGRADATION, elem_id="degradation", scale=3,
                        label="Simulate a degradation",
                        info="Damage a clean photo on purpose to see the model repair it (and get scores).")
                    level = gr.Slider(minimum=noise.minimum, maximum=noise.maximum, step=noise.step,
                                      value=noise.default, label=noise.level_label, visible=False, scale=2,
                                      elem_id="level")
                with gr.Row():
                    run_button = gr.Button("Restore", variant="primary", elem_id="restore-button", scale=4)
                    stop_button = gr.Button("Stop", variant="secondary", size="sm", interactive=False,
                                            elem_id="stop-button", scale=1, min_width=80)
                status = gr.Markdown("Press **Restore** to repair the photo." if samples else
                                     "Upload a photo, then press **Restore**.", elem_id="status")
                if samples:
                    gallery = gr.Gallery(
                        value=[(path, os.path.splitext(os.path.basename(path))[0]) for path in samples],
                        label="Sample photos (click one to use it)", columns=6, rows=1, height=150, allow_preview=False,
                        selected_index=0, interactive=False, buttons=[], elem_id="samples")
                with gr.Accordion("Advanced settings", open=False):
                    prompt = gr.Textbox(
                        label="Prompt", value="", placeholder="empty: the model's default",
                        interactive="prompt" not in disabled, elem_id="prompt",
                        info=disabled.get("prompt", "A few words describing the photo (optional). Most restorers "
                                                    "work well without one."))
                    steps = gr.Slider(1, 50, step=1, value=start["num_inference_steps"], label="Steps",
                                      info=f"How many refinement passes the model makes; more is slower. "
                                           f"{steps_note}", elem_id="steps")
                    guidance = gr.Slider(
                        1.0, 10.0, step=0.1, value=start["guidance_scale"], label="Guidance scale",
                        interactive="guidance_scale" not in disabled, elem_id="guidance",
                        info=disabled.get("guidance_scale", "How hard the result is pushed away from \"blurry, "
                                                            "noisy, low quality\". 1 = off (and twice as fast)."))
                    several = not one_step
                    restoration_guidance = gr.Slider(
                        0.0, 10.0, step=0.1, value=start["restoration_guidance"], label="Restoration guidance",
                        interactive=several, info=restoration_guidance_info(several), elem_id="restoration-guidance")
                    strength = gr.Slider(0.05, 1.0, step=0.05, value=start["strength"], label="Strength",
                                         interactive=several, info=strength_info(several), elem_id="strength")
                    fidelity = gr.Slider(
                        0.0, 1.0, step=0.05, value=start["fidelity"], label="Fidelity", elem_id="fidelity",
                        info="How much of your photo's fine detail is put back into the result: 1 keeps all of it, "
                             "0 only the model's own.")
                    color_fix = gr.Radio(
                        ["wavelet", "adain", "none"], value="wavelet", label="Colour fix", elem_id="color-fix",
                        info="Keeps your photo's colours: wavelet matches them region by region (recommended), "
                             "adain matches the overall balance, none keeps the model's (to remove a colour cast).")
                    upscale = gr.Slider(
                        1.0, 4.0, step=0.5, value=start["upscale"], label="Upscale", elem_id="upscale",
                        info=f"Make the result this many times larger (at most {app.max_image_side} px per side).")
                    seed = gr.Number(value=0, precision=0, label="Seed", elem_id="seed",
                                     info="Another number gives another random variation (of the simulated damage "
                                          "too); the same number repeats a result.")
                    tile_size = gr.Textbox(
                        value="auto", label="Tile size (px)", elem_id="tile-size",
                        info=f"Big photos are processed in overlapping square tiles of this size to save memory: "
                             f"auto = the model's own size ({getattr(app.pipe, 'default_tile_size', '?')} px), "
                             f"0 = never split, or a multiple of {multiple}.")
            with gr.Column():
                comparison = gr.ImageSlider(label="Before (left) · Restored (right)", type="pil",
                                            format="png", elem_id="comparison", buttons=["download", "fullscreen"])
                download = gr.File(label="Download the restored image (PNG, full resolution)", elem_id="download")
                scores = gr.Markdown("Simulate a degradation to see PSNR / SSIM against the clean photo.",
                                     elem_id="scores")
                with gr.Accordion("Details", open=False):
                    used = gr.JSON(label="Pipeline arguments used and scores")

        results = [comparison, download, scores, used]
        image.upload(check_upload, inputs=image, outputs=[image, *results, status], preprocess=False,
                     api_visibility="private", show_progress="hidden")
        image.clear(lambda: (*cleared, "Upload a photo or pick a sample photo, then press **Restore**."),
                    inputs=None, outputs=[*results, status], api_visibility="private", show_progress="hidden")
        if samples:
            gallery.select(pick_sample, inputs=None, outputs=[image, *results, status], api_visibility="private",
                           show_progress="hidden")
        demo.load(ready, inputs=None, outputs=[degradation, level], queue=False, api_visibility="private",
                  show_progress="hidden")
        degradation.input(level_control, inputs=degradation, outputs=level, api_visibility="private",
                          show_progress="hidden")
        steps.change(step_dependent, inputs=steps, outputs=[restoration_guidance, strength],
                     api_visibility="private", show_progress="hidden")
        restore_event = run_button.click(
            busy, inputs=None, outputs=[run_button, stop_button, status], queue=False, api_visibility="private",
            show_progress="hidden",
        ).then(
            restore,
            inputs=[image, degradation, level, prompt, steps, guidance, restoration_guidance, strength, fidelity,
                    color_fix, upscale, seed, tile_size],
            outputs=[*results, status],
            api_name="restore",
            preprocess=False,  # the upload is opened by the package's reader, with its messages
            concurrency_limit=1,
            concurrency_id="pipeline",
            show_progress="hidden",  # the status line under the button shows the progress
        )
        for after in (restore_event.then, restore_event.failure):  # Gradio's `then` does not follow a failure
            after(idle, inputs=None, outputs=[run_button, stop_button], queue=False, api_visibility="private",
                  show_progress="hidden")
        stop_button.click(cancel, inputs=None, outputs=None, queue=False, api_name="cancel")
        stop_button.click(stopping, inputs=None, outputs=stop_button, queue=False, api_visibility="private",
                          show_progress="hidden")
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
    samples = sample_photo_files(tempfile.mkdtemp(prefix="sana-restore-samples-"), max_side=max_image_side)
    demo = build_demo(app, samples)
    demo.queue(default_concurrency_limit=1, max_size=max_queue_size)
    system_fonts = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                                     font_mono=["ui-monospace", "monospace"])
    launch_kwargs = dict(server_name=host, server_port=port, max_file_size=max_file_size, theme=system_fonts,
                         css=APP_CSS, ssr_mode=False, show_error=True, prevent_thread_lock=True, quiet=False)
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
