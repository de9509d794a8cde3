"""examples/space/app.py: the Space shim hands its environment variables to `diffusers_restore.app.launch`."""

import os
import runpy

import diffusers_restore.app

SPACE_APP = os.path.join(os.path.dirname(os.path.abspath(__file__)), "space", "app.py")


def _run(monkeypatch, env):
    calls = []
    monkeypatch.setattr(diffusers_restore.app, "launch", lambda **kwargs: calls.append(kwargs))
    for name in ("SANA_RESTORE_MODEL", "SANA_RESTORE_MAX_IMAGE_SIDE", "GRADIO_SERVER_NAME", "GRADIO_SERVER_PORT"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    runpy.run_path(SPACE_APP, run_name="__main__")
    assert len(calls) == 1
    return calls[0]


def test_space_defaults_to_the_bundled_restorer_on_all_interfaces(monkeypatch):
    kwargs = _run(monkeypatch, {})
    assert kwargs == {"model": "bundled", "host": "0.0.0.0", "port": 7860,
                      "max_image_side": diffusers_restore.app.DEFAULT_MAX_IMAGE_SIDE}


def test_space_reads_the_model_and_limits_from_its_variables(monkeypatch):
    kwargs = _run(monkeypatch, {"SANA_RESTORE_MODEL": "org/sana-restore", "SANA_RESTORE_MAX_IMAGE_SIDE": "1024",
                                "GRADIO_SERVER_PORT": "8080"})
    assert kwargs["model"] == "org/sana-restore" and kwargs["max_image_side"] == 1024 and kwargs["port"] == 8080


def test_space_readme_front_matter_names_the_app():
    with open(os.path.join(os.path.dirname(SPACE_APP), "README.md"), encoding="utf-8") as handle:
        text = handle.read()
    front_matter = text.split("---")[1]
    assert "sdk: gradio" in front_matter and "app_file: app.py" in front_matter
