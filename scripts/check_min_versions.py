#!/usr/bin/env python
"""Prove the version floors that setup.py declares: install the oldest releases they allow in separate venvs and run
the test suite there.

    python scripts/check_min_versions.py [--venv /tmp/minvenv] [--phase all|dev|core] [-- pytest args]

The floors are parsed from setup.py (`install_requires` and `extras`), so they cannot drift from what is declared;
every requirement must carry a `>=` floor. Resolution is uv's `--resolution lowest-direct`: each package this project
names gets the oldest release that its floor and every other constraint allow (a floor can be lifted only by another
package's requirements, and the script prints each package above its floor). Two venvs:

* ``dev`` (``<venv>-dev``): ``-e .[dev]``, every extra included, then ``pytest tests examples``.
* ``core`` (``<venv>-core``): ``-e .`` at the ``install_requires`` floors (transformers 5.0, huggingface-hub 1.23,
  ...) plus the test tools at their floors, then ``pytest tests``. The tests' offline Hub (``tests/hub_server.py``)
  needs huggingface-hub 2, so the tests that use it are skipped there by this file acting as a pytest plugin
  (``-p check_min_versions``); ``examples/`` needs the ``train`` extra and runs in ``dev`` only.

PyPI has no CPU-only torch build for Linux: the torch floor is the regular (CUDA) wheel, which runs on a CPU-only
machine. The first run downloads a few GB and takes a while; it is not part of CI's ``.ci/run``.
"""

from __future__ import annotations

import argparse
import ast
import os
import re
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_REQUIREMENT = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)\s*>=\s*([0-9][0-9A-Za-z.]*)$")


def _literal(tree: ast.Module, name: str):
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in node.targets):
            return ast.literal_eval(node.value)
    raise SystemExit(f"setup.py: no literal assignment to `{name}`.")


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _version_key(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", version))


def declared_floors(setup_py: str = os.path.join(ROOT, "setup.py")) -> dict[str, dict[str, str]]:
    """`{group: {package: floor}}` for `install_requires` and every extra, names normalised (`huggingface-hub`)."""
    with open(setup_py, encoding="utf-8") as handle:
        tree = ast.parse(handle.read(), setup_py)
    groups = {"install_requires": _literal(tree, "install_requires"), **_literal(tree, "extras")}
    floors = {}
    for group, requirements in groups.items():
        floors[group] = {}
        for requirement in requirements:
            match = _REQUIREMENT.match(requirement.strip())
            if not match:
                raise SystemExit(f"setup.py ({group}): `{requirement}` has no `>=` floor; every requirement needs one.")
            floors[group][_normalise(match.group(1))] = match.group(2)
    return floors


def _run(command: list[str], **kwargs) -> int:
    print("+", " ".join(command), flush=True)
    return subprocess.call(command, **kwargs)


def _create(venv: str) -> str:
    shutil.rmtree(venv, ignore_errors=True)
    python = os.path.join(venv, "bin", "python")
    if _run([sys.executable, "-m", "venv", venv]) or _run([python, "-m", "pip", "install", "--quiet", "uv"]):
        raise SystemExit(f"could not create {venv} with uv")
    return python


def _install(python: str, *requirements: str) -> dict[str, str]:
    """`uv pip install --resolution lowest-direct`; returns the installed versions."""
    command = [python, "-m", "uv", "pip", "install", "--python", python, "--resolution", "lowest-direct", *requirements]
    if _run(command) != 0:
        raise SystemExit("installing the floors failed: they are not installable together")
    freeze = subprocess.run([python, "-m", "uv", "pip", "freeze", "--python", python], capture_output=True, text=True)
    print(freeze.stdout, flush=True)
    installed = {}
    for line in freeze.stdout.splitlines():
        if "==" in line:
            name, version = line.split("==", 1)
            installed[_normalise(name)] = version.split("+")[0]
    return installed


def _compare(expected: dict[str, str], installed: dict[str, str]) -> None:
    for name, floor in sorted(expected.items()):
        got = installed.get(name)
        if got is None:
            print(f"  {name}: NOT INSTALLED (floor {floor})")
        elif _version_key(got) != _version_key(floor):
            print(f"  {name}: {got} (floor {floor}: resolved above it)")
        else:
            print(f"  {name}: {got} (the floor)")


def _pytest(python: str, paths: list[str], *extra: str) -> int:
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=os.path.join(ROOT, "scripts"))
    return _run([python, "-m", "pytest", *paths, "-q", "-p", "no:cacheprovider", *extra], cwd=ROOT, env=env)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--venv", default="/tmp/minvenv", help="prefix of the venvs (default /tmp/minvenv)")
    parser.add_argument("--phase", choices=["all", "dev", "core"], default="all")
    parser.add_argument("pytest_args", nargs="*", help="extra pytest arguments (after --)")
    args = parser.parse_args()

    floors = declared_floors()
    core = floors["install_requires"]
    union: dict[str, str] = {}
    for group in floors.values():
        for name, version in group.items():
            if name not in union or _version_key(version) > _version_key(union[name]):
                union[name] = version
    results = {}
    if args.phase in ("all", "dev"):
        python = _create(f"{args.venv}-dev")
        installed = _install(python, "-e", f"{ROOT}[dev]")
        print("dev: declared floor -> installed")
        _compare(union, installed)
        results["dev"] = _pytest(python, ["tests", "examples"], *args.pytest_args)
    if args.phase in ("all", "core"):
        python = _create(f"{args.venv}-core")
        tools = [f"{name}>={version}" for name, version in floors["test"].items() if name not in core]
        installed = _install(python, "-e", ROOT, *tools)
        print("core: declared floor -> installed")
        _compare({**core, **{name: floors["test"][name] for name in floors["test"] if name not in core}}, installed)
        results["core"] = _pytest(
            python, ["tests"], "--ignore=tests/test_testing_hub.py", "-p", "check_min_versions", *args.pytest_args
        )
    print("results (pytest exit codes):", results, flush=True)
    return max(results.values(), default=0)


# ---------------------------------------------------------------------------------------------- pytest plugin
def pytest_collection_modifyitems(config, items):
    """With huggingface-hub < 2 (no httpx2), skip the tests that need the offline Hub of tests/hub_server.py."""
    import pytest

    try:
        import httpx2  # noqa: F401
    except ImportError:
        skip = pytest.mark.skip(reason="the offline Hub (tests/hub_server.py) needs huggingface-hub >= 2")
        for item in items:
            if "hub" in getattr(item, "fixturenames", ()) or "hub_server" in getattr(item.module, "__dict__", {}):
                item.add_marker(skip)


if __name__ == "__main__":
    sys.exit(main())
