"""Model store resolution over fake HF cache trees and store folders (no weights needed)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from engine.errors import ModelNotFound
from engine.models.resolution import ModelStore


def make_model(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    return folder


def make_hf_repo(cache: Path, repo_id: str, revision: str = "abc123", ref: str = "main") -> Path:
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snap = make_model(repo / "snapshots" / revision)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / ref).write_text(revision)
    (repo / "blobs").mkdir(exist_ok=True)
    return snap


@pytest.fixture
def store(tmp_path: Path) -> ModelStore:
    make_model(tmp_path / "home" / "models" / "Local-One")
    (tmp_path / "home" / "models" / "Half.partial").mkdir()
    make_hf_repo(tmp_path / "hub", "org/Alpha")
    make_hf_repo(tmp_path / "hub", "other/Beta")
    make_hf_repo(tmp_path / "hub", "third/Beta")
    return ModelStore(tmp_path / "home" / "models", tmp_path / "hub")


def test_lists_store_and_hf_cache(store: ModelStore):
    ids = {e.id: e.source for e in store.entries()}
    assert ids == {"Local-One": "store", "org/Alpha": "hf-cache", "other/Beta": "hf-cache", "third/Beta": "hf-cache"}


def test_resolves_hf_snapshot_of_main(store: ModelStore, tmp_path: Path):
    entry = store.resolve("org/Alpha")
    assert entry.path == tmp_path / "hub" / "models--org--Alpha" / "snapshots" / "abc123"


def test_bare_name_only_when_unambiguous(store: ModelStore):
    assert store.resolve("Alpha").id == "org/Alpha"
    with pytest.raises(ModelNotFound):
        store.resolve("Beta")


@pytest.mark.parametrize("bad", ["../models/Local-One", "/etc", "..", "org/../org/Alpha", "%2e%2e%2fetc",
                                 "..%2F..%2Fetc", "Local-One/../../", "models--org--Alpha", "", "Local-One\x00"])
def test_ids_never_reach_outside_the_store(store: ModelStore, bad: str):
    with pytest.raises(ModelNotFound):
        store.resolve(bad)


def test_symlink_in_store_is_listed_by_its_own_name_only(store: ModelStore, tmp_path: Path):
    outside = make_model(tmp_path / "outside" / "Secret")
    (tmp_path / "home" / "models" / "Linked").symlink_to(outside)
    assert store.resolve("Linked").path.name == "Linked"
    with pytest.raises(ModelNotFound):
        store.resolve(str(outside))


def test_local_folder_from_cli_wins(store: ModelStore, tmp_path: Path):
    local = make_model(tmp_path / "elsewhere" / "Local-One")
    store.add_local(local)
    assert store.resolve("Local-One").source == "local"


def test_missing_cache_is_empty(tmp_path: Path):
    assert ModelStore(tmp_path / "none", tmp_path / "nohub").entries() == []
