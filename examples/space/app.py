"""A Hugging Face Space that serves diffusers-restore's web app (`sana-restore app`).

The Space runs this file (README.md's front matter names it). Settings come from the Space's variables:

* ``SANA_RESTORE_MODEL``: the restorer, a Hub repo id (``org/sana-restore``) or ``bundled`` (default: the small
  restorer shipped in the package, which needs no download);
* ``SANA_RESTORE_MAX_IMAGE_SIDE``: longest accepted side in pixels (default 2048).

Run it locally the same way: ``SANA_RESTORE_MODEL=bundled python examples/space/app.py``.
"""

import os

from diffusers_restore.app import DEFAULT_MAX_IMAGE_SIDE, launch

if __name__ == "__main__":
    launch(
        model=os.environ.get("SANA_RESTORE_MODEL", "bundled"),
        host=os.environ.get("GRADIO_SERVER_NAME", "0.0.0.0"),
        port=int(os.environ.get("GRADIO_SERVER_PORT", "7860")),
        max_image_side=int(os.environ.get("SANA_RESTORE_MAX_IMAGE_SIDE", DEFAULT_MAX_IMAGE_SIDE)),
    )
