"""The offline Hub stand-in (`tests/hub_server.py`) against the real huggingface_hub client, on 127.0.0.1 only."""

import base64
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import httpx2
import pytest
import torch
from huggingface_hub import (
    HfApi,
    constants,
    create_repo,
    hf_api,
    hf_hub_download,
    list_repo_files,
    model_info,
    snapshot_download,
    upload_folder,
)
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from safetensors.torch import load_file, save_file

from hub_server import LocalHubServer, hub_endpoint

TOKEN = "hf_local_test_token"
# Bounds every client request of these tests (the server is local: real answers take milliseconds).
CLIENT_TIMEOUT = 30.0


def _write_folder(folder: Path) -> dict[str, bytes]:
    """A small model-like folder: text, JSON, a binary safetensors file in a subfolder, a model card, a log."""
    (folder / "sub").mkdir(parents=True)
    (folder / "notes.txt").write_text("restoration notes\n")
    (folder / "config.json").write_text(json.dumps({"channels": 4}))
    save_file({"weight": torch.arange(12, dtype=torch.float32).reshape(3, 4)}, str(folder / "sub" / "w.safetensors"))
    (folder / "README.md").write_text("---\nlicense: apache-2.0\ntags:\n- image-restoration\n---\n# Tiny\n")
    (folder / "train.log").write_text("step 1\n")
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def _read_tree(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in Path(folder).rglob("*")
        if p.is_file() and ".cache" not in p.relative_to(folder).parts
    }


@pytest.mark.parametrize("disable_xet", [False, True], ids=["pipelined-upload", "single-commit-upload"])
def test_upload_folder_then_snapshot_download_is_byte_identical(tmp_path, disable_xet):
    local = _write_folder(tmp_path / "src")
    expected = {path: data for path, data in local.items() if not path.endswith(".log")}
    with LocalHubServer() as server, hub_endpoint(server.url, timeout=CLIENT_TIMEOUT, disable_xet=disable_xet):
        repo_id = create_repo("org/tiny", token=TOKEN, exist_ok=True).repo_id
        assert create_repo("org/tiny", token=TOKEN, exist_ok=True).repo_id == repo_id == "org/tiny"
        with pytest.raises(HfHubHTTPError) as conflict:
            create_repo("org/tiny", token=TOKEN)
        assert conflict.value.response.status_code == 409

        commit = upload_folder(repo_id=repo_id, folder_path=tmp_path / "src", token=TOKEN, ignore_patterns=["*.log"])
        assert commit.oid == server.head(repo_id)

        snapshot = snapshot_download(repo_id, cache_dir=tmp_path / "cache", etag_timeout=CLIENT_TIMEOUT)
        assert Path(snapshot).name == commit.oid
        assert _read_tree(Path(snapshot)) == expected
        assert _read_tree(server.repo_path(repo_id)) == expected
        assert sorted(list_repo_files(repo_id)) == sorted(expected)
        weights = load_file(os.path.join(snapshot, "sub", "w.safetensors"))
        assert torch.equal(weights["weight"], torch.arange(12, dtype=torch.float32).reshape(3, 4))

        calls = {(request.method, request.path) for request in server.requests}
        # Both client upload paths check README.md metadata, ask preupload for the upload mode, then commit.
        for call in ("/api/validate-yaml", "/api/models/org/tiny/preupload/main", "/api/models/org/tiny/commit/main"):
            assert ("POST", call) in calls
        assert server.errors == []


def test_hf_hub_download_single_file_and_missing_entry(hub, tmp_path):
    local = _write_folder(tmp_path / "src")
    head = hub.add_repo("org/prefilled", tmp_path / "src")

    path = hf_hub_download("org/prefilled", "sub/w.safetensors", cache_dir=tmp_path / "cache")
    assert Path(path).read_bytes() == local["sub/w.safetensors"]
    assert f"snapshots/{head}/sub/w.safetensors" in Path(path).as_posix()
    assert ("HEAD", "/org/prefilled/resolve/main/sub/w.safetensors") in [(r.method, r.path) for r in hub.requests]

    with pytest.raises(EntryNotFoundError):
        hf_hub_download("org/prefilled", "missing.bin", cache_dir=tmp_path / "cache")

    api = HfApi()
    top = {(type(entry).__name__, entry.path) for entry in api.list_repo_tree("org/prefilled")}
    assert top == {("RepoFolder", "sub")} | {("RepoFile", p) for p in local if "/" not in p}
    (inside,) = api.list_repo_tree("org/prefilled", path_in_repo="sub")
    assert (inside.path, inside.size) == ("sub/w.safetensors", len(local["sub/w.safetensors"]))


def test_model_info_siblings_revisions_and_deletions(hub, tmp_path):
    (tmp_path / "v1").mkdir()
    (tmp_path / "v1" / "a.txt").write_text("first")
    (tmp_path / "v1" / "b.txt").write_text("kept")
    first = upload_folder(repo_id=create_repo("org/history", token=TOKEN).repo_id, folder_path=tmp_path / "v1")

    info = HfApi().model_info("org/history", files_metadata=True, timeout=CLIENT_TIMEOUT)
    assert info.id == "org/history" and info.sha == first.oid
    assert {(s.rfilename, s.size) for s in info.siblings} == {("a.txt", 5), ("b.txt", 4)}

    # Unchanged files are skipped client-side (preupload reports their git oid): no new commit.
    assert upload_folder(repo_id="org/history", folder_path=tmp_path / "v1").oid == first.oid

    (tmp_path / "v2").mkdir()
    (tmp_path / "v2" / "c.txt").write_text("second")
    second = upload_folder(repo_id="org/history", folder_path=tmp_path / "v2", delete_patterns=["a.txt"])
    assert second.oid != first.oid == model_info("org/history", revision=first.oid).sha
    assert sorted(s.rfilename for s in model_info("org/history").siblings) == ["b.txt", "c.txt"]
    assert sorted(os.listdir(hub.repo_path("org/history"))) == ["b.txt", "c.txt"]
    # The old commit stays readable by its id.
    old = hf_hub_download("org/history", "a.txt", revision=first.oid, cache_dir=tmp_path / "cache")
    assert Path(old).read_text() == "first"

    with pytest.raises(RevisionNotFoundError):
        model_info("org/history", revision="0" * 40)


def test_create_repo_without_namespace_uses_the_server_user(hub):
    assert create_repo("plain-name", token=TOKEN).repo_id == f"{hub.user}/plain-name"
    assert model_info(f"{hub.user}/plain-name").siblings == []


def test_missing_repo_raises_repository_not_found(hub, tmp_path):
    with pytest.raises(RepositoryNotFoundError):
        snapshot_download("org/does-not-exist", cache_dir=tmp_path / "cache")
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("org/does-not-exist", "config.json", cache_dir=tmp_path / "cache")
    with pytest.raises(RepositoryNotFoundError):
        model_info("org/does-not-exist")


def test_require_token_rejects_requests_without_authorization(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.txt").write_text("secret")
    with LocalHubServer(require_token=True) as server, hub_endpoint(server.url, timeout=CLIENT_TIMEOUT):
        with pytest.raises(HfHubHTTPError) as no_token:
            create_repo("org/private", token=False, exist_ok=True)
        assert no_token.value.response.status_code == 401
        assert "require_token" in str(no_token.value)

        create_repo("org/private", token=TOKEN, private=True)
        upload_folder(repo_id="org/private", folder_path=tmp_path / "src", token=TOKEN)
        with pytest.raises(HfHubHTTPError) as download:
            hf_hub_download("org/private", "a.txt", token=False, cache_dir=tmp_path / "cache")
        assert download.value.response.status_code == 401

        path = hf_hub_download("org/private", "a.txt", token=TOKEN, cache_dir=tmp_path / "cache")
        assert Path(path).read_text() == "secret"
        assert model_info("org/private", token=TOKEN).private is True
        tokens = {r.token for r in server.requests if r.path.startswith(("/api/models/org/private", "/org/private"))}
        assert tokens == {None, TOKEN}


def test_diffusers_model_push_to_hub_then_from_pretrained(hub, tmp_path):
    from diffusers_restore import ConcatConditionedTransformer
    from diffusers_restore.testing import get_tiny_transformer

    model = ConcatConditionedTransformer.from_transformer(get_tiny_transformer())
    with torch.no_grad():
        for parameter in model.parameters():  # no zero-initialised layer left: every tensor must round-trip
            parameter.add_(torch.randn_like(parameter))
    model.push_to_hub("org/tiny-concat", token=TOKEN)
    files = set(list_repo_files("org/tiny-concat"))
    assert {"README.md", "config.json", "diffusion_pytorch_model.safetensors"} <= files

    loaded = ConcatConditionedTransformer.from_pretrained("org/tiny-concat", cache_dir=tmp_path / "cache")
    expected, actual = model.state_dict(), loaded.state_dict()
    assert expected.keys() == actual.keys()
    for name in expected:
        assert torch.equal(expected[name], actual[name]), name
    assert dict(loaded.config) == dict(model.config) | {"_name_or_path": "org/tiny-concat"}


def test_diffusion_pipeline_from_pretrained_by_repo_id(hub, tmp_path):
    from diffusers import SanaPipeline

    from diffusers_restore.testing import save_tiny_sana_pipeline

    folder = tmp_path / "tiny-sana"
    save_tiny_sana_pipeline(folder)
    hub.add_repo("org/tiny-sana", folder)

    pipe = SanaPipeline.from_pretrained("org/tiny-sana", cache_dir=tmp_path / "cache")
    reference = SanaPipeline.from_pretrained(folder)
    for name in ("transformer", "vae", "text_encoder"):
        expected, actual = getattr(reference, name).state_dict(), getattr(pipe, name).state_dict()
        assert all(torch.equal(expected[key], actual[key]) for key in expected), name
    assert dict(pipe.scheduler.config) == dict(reference.scheduler.config)
    # DiffusionPipeline.download lists the repo through model_info before fetching files.
    assert ("GET", "/api/models/org/tiny-sana") in [(r.method, r.path) for r in hub.requests]


def test_subprocess_client_uses_env(tmp_path):
    local = _write_folder(tmp_path / "src")
    script = textwrap.dedent(
        """
        import json, sys
        from huggingface_hub import snapshot_download
        print(json.dumps(snapshot_download(sys.argv[1], cache_dir=sys.argv[2])))
        """
    )
    with LocalHubServer() as server:
        server.add_repo("org/from-env", tmp_path / "src")
        result = subprocess.run(
            [sys.executable, "-c", script, "org/from-env", str(tmp_path / "cache")],
            env={**os.environ, **server.env()},
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 0, result.stderr
        assert _read_tree(Path(json.loads(result.stdout.strip().splitlines()[-1]))) == local
        assert server.errors == []


def test_hub_endpoint_restores_the_client_state(monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)

    def client_state():
        return constants.ENDPOINT, constants.HUGGINGFACE_CO_URL_TEMPLATE, constants.HF_URL_HOSTS, hf_api.api.endpoint

    before = client_state()
    with LocalHubServer() as server:
        server.add_repo("org/restore")
        with hub_endpoint(server.url + "/", timeout=CLIENT_TIMEOUT) as endpoint:
            assert endpoint == server.url and constants.ENDPOINT == server.url
            assert constants.HF_HUB_OFFLINE is False
            assert model_info("org/restore").sha == server.head("org/restore")
        assert constants.HF_HUB_OFFLINE is True
        assert client_state() == before
        seen = len(server.requests)
        with pytest.raises(OfflineModeIsEnabled):
            model_info("org/restore")
        assert len(server.requests) == seen


def test_server_rejects_unsafe_commit_paths(hub):
    hub.add_repo("org/safe")
    lines = [
        {"key": "header", "value": {"summary": "escape"}},
        {"key": "file", "value": {"path": "../escape.txt", "content": base64.b64encode(b"x").decode()}},
    ]
    with httpx2.Client(trust_env=False, timeout=CLIENT_TIMEOUT) as client:
        response = client.post(
            f"{hub.url}/api/models/org/safe/commit/main",
            content=b"".join(json.dumps(line).encode() + b"\n" for line in lines),
            headers={"Content-Type": "application/x-ndjson"},
        )
        unknown = client.get(f"{hub.url}/api/spaces/org/safe")
    assert response.status_code == 400 and "escape.txt" in response.json()["error"]
    assert not (hub.root / "org" / "escape.txt").exists()
    assert list_repo_files("org/safe") == []
    assert unknown.status_code == 404 and "model repos" in unknown.headers["X-Error-Message"]


def test_bad_arguments_raise_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="url"):
        with hub_endpoint("127.0.0.1:8080"):
            pass
    with LocalHubServer() as server:
        with pytest.raises(ValueError, match="repo_id"):
            server.add_repo("no-namespace", tmp_path)
        with pytest.raises(ValueError, match="folder"):
            server.add_repo("org/repo", tmp_path / "missing")
        with pytest.raises(ValueError, match="repo_id"):
            server.repo_path("org/never-created")
    with pytest.raises(RuntimeError, match="not running"):
        _ = server.url
