"""Models from the Hugging Face Hub: `openmlx pull ORG/NAME[@REVISION]`, `openmlx rm`, and the
server's on-demand download (`--allow-download`).

A GGUF repo (no config.json and safetensors, or a quantization named) gets one `.gguf` file:
`ORG/NAME-GGUF:Q4_K_M` picks the file whose name carries that quantization (as Ollama and
llama.cpp's `-hf` name them), `--file NAME.gguf` names it; a repo with one GGUF file needs neither.
The file is converted into the store once (engine/models/gguf_import.py) and the download removed.

huggingface_hub does the transfer (resumable, `HF_TOKEN` for gated repos, `HF_ENDPOINT`,
`HF_HUB_OFFLINE`). What openmlx adds is the checking around it, so a download never leaves
something half-usable behind:
1. the repo's file list is read first: only the files a model needs are fetched (config,
   tokenizer, safetensors + index, chat template, processor configs); a repo without config.json
   or safetensors weights is refused before anything is downloaded;
2. the weights' total size is checked against free disk and the memory gate before the transfer;
3. config.json and the small files come first, and the architecture is checked (a model the
   installed mlx-lm/mlx-vlm can't run is refused before its weights are fetched);
4. everything lands in a staging folder (`models/.downloads/ORG--NAME`, where an interrupted
   download resumes) and is probed; only a model the probe accepts is moved, in one rename, to
   `models/ORG/NAME`, which the store serves as `ORG/NAME`.
One download runs at a time per process (a later one waits at most its timeout); every transfer is
guarded by engine/models/hub_transfer.py (public addresses only, the declared bytes, a deadline), and
`--max-store-bytes` makes room by removing the downloaded models used least recently.
"""
from __future__ import annotations

import fnmatch
import json
import logging
import os
import re
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from engine.errors import DownloadFailed, EngineError, InvalidRequest, ModelAccessDenied, ModelNotFound, Unsupported
from engine.models import hub_transfer
from engine.models.memory import MemoryEstimate, MemoryGate
from engine.models.probe import Probe, config_problem, probe
from engine.models.store_marks import PULLED_MARK

log = logging.getLogger("openmlx.hub")

# What a model needs; nothing else (other formats' weights, READMEs, images) is fetched.
MODEL_FILES = ("config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json",
               "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
               "tokenizer.model", "vocab.json", "merges.txt", "*.tiktoken", "chat_template.json",
               "chat_template.jinja", "preprocessor_config.json", "processor_config.json",
               "video_preprocessor_config.json", "sentence_bert_config.json", "modules.json")
_LOCK = threading.Lock()  # one download at a time
# The Hub's own rules for names (huggingface_hub's validate_repo_id): letters, digits, - _ . up to 96.
_REPO_PART = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,95}")
_REVISION = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-/]{0,199}")
_COMMIT = re.compile(r"[0-9a-f]{40}")
DOWNLOAD_TIMEOUT_S = 3600.0
USED_MARK = ".openmlx-used"  # touched when such a model is loaded: least recently used goes first


@dataclass(frozen=True)
class RepoFiles:
    """What a Hub repo holds that a model needs, at one commit."""

    repo_id: str
    revision: str  # the commit the download is pinned to
    files: tuple[str, ...]
    weight_bytes: int
    total_bytes: int
    gguf: bool = False  # `files` is the one GGUF file chosen


@dataclass(frozen=True)
class Pulled:
    """A model now in the store."""

    id: str
    path: Path
    probe: Probe
    seconds: float


def parse_spec(spec: str) -> tuple[str, Optional[str]]:
    """`ORG/NAME[@REVISION]` -> (repo id, revision or None); a 400-style error otherwise."""
    repo, _, revision = spec.partition("@")
    parts = repo.split("/")
    if len(parts) != 2 or not all(_REPO_PART.fullmatch(p) for p in parts) or ".." in repo \
            or (revision and not _REVISION.fullmatch(revision)):
        raise InvalidRequest(f"'{spec[:200]}' is not a Hugging Face repo id: expected ORG/NAME[@REVISION]",
                             param="model", code="invalid_model_id")
    return repo, revision or None


def _endpoint() -> Optional[str]:
    # Read at call time (huggingface_hub reads HF_ENDPOINT once, at import).
    return os.environ.get("HF_ENDPOINT") or None


def _wanted(name: str) -> bool:
    return "/" not in name and any(fnmatch.fnmatch(name, pattern) for pattern in MODEL_FILES)


_SPLIT_GGUF = re.compile(r"-\d{5}-of-\d{5}\.gguf$")


def split_quantization(spec: str) -> tuple[str, Optional[str]]:
    """`ORG/NAME[@REVISION][:QUANT]` -> (the spec without `:QUANT`, QUANT or None)."""
    base, colon, quant = spec.rpartition(":")
    if colon and "/" in base and quant and re.fullmatch(r"[A-Za-z0-9_.\-]{1,64}", quant):
        return base, quant
    return spec, None


def choose_gguf(repo_id: str, files: dict[str, int], wanted: Optional[str]) -> str:
    """The one GGUF file of a repo to fetch: the file named `wanted`, the one whose name carries the
    quantization `wanted` (Q4_K_M matches ...-q4_k_m.gguf, not ...-q4_k_s.gguf), or the only one."""
    if wanted in files:
        return wanted
    whole = [n for n in sorted(files) if not _SPLIT_GGUF.search(n)]
    if wanted:
        pattern = re.compile(rf"(?<![A-Z0-9]){re.escape(wanted.upper())}(?![A-Z0-9_])")
        matches = [n for n in sorted(files) if pattern.search(n.upper())]
    else:
        matches = whole
    if matches and all(_SPLIT_GGUF.search(n) for n in matches):
        raise Unsupported(f"'{repo_id}' holds {wanted or 'its model'} as a split GGUF ({matches[0]}, ...); openmlx "
                          "reads single-file GGUFs: merge the parts with llama.cpp's gguf-split --merge and serve the file")
    matches = [n for n in matches if not _SPLIT_GGUF.search(n)]
    if len(matches) == 1:
        return matches[0]
    offered = ", ".join(whole) or "none"
    if not matches:
        raise Unsupported(f"'{repo_id}' has no GGUF file for '{wanted}'; its GGUF files: {offered}")
    raise Unsupported(f"'{repo_id}' has several GGUF files; name one as {repo_id}:QUANT (e.g. :Q4_K_M) or with "
                      f"--file: {offered}")


def repo_files(repo_id: str, revision: Optional[str] = None, gguf: Optional[str] = None) -> RepoFiles:
    """The repo's model files at `revision` (from the Hub's model info), or a clear refusal.
    `gguf`: a quantization or file name: the repo's GGUF file of that name is what is fetched."""
    from huggingface_hub import HfApi

    with _hub_errors(repo_id):
        info = HfApi(endpoint=_endpoint()).model_info(repo_id, revision=revision, files_metadata=True)
    siblings = [s for s in (info.siblings or []) if _wanted(s.rfilename)]
    names = {s.rfilename for s in siblings}
    ggufs = {s.rfilename: int(s.size or 0) for s in (info.siblings or [])
             if s.rfilename.endswith(".gguf") and "/" not in s.rfilename}
    mlx = "config.json" in names and any(n.endswith(".safetensors") for n in names)
    if ggufs and (gguf or not mlx):
        if not info.sha or not _COMMIT.fullmatch(info.sha):
            raise DownloadFailed(f"The Hub answered '{repo_id}' with an invalid commit id; refusing to download it")
        chosen = choose_gguf(repo_id, ggufs, gguf)
        return RepoFiles(repo_id, info.sha, (chosen,), ggufs[chosen], ggufs[chosen], gguf=True)
    if gguf:
        raise Unsupported(f"'{repo_id}' has no GGUF files; pull it without ':{gguf}' or --file")
    if "config.json" not in names:
        raise Unsupported(f"'{repo_id}' has no config.json: it is not a Transformers/MLX model repo")
    if not any(n.endswith(".safetensors") for n in names):
        raise Unsupported(f"'{repo_id}' has no safetensors weights (openmlx serves MLX/safetensors models; "
                          f"a GGUF or PyTorch-only repo needs converting, e.g. with mlx_lm.convert)")
    weights = sum(s.size or 0 for s in siblings if s.rfilename.endswith(".safetensors"))
    # The commit names folders and goes into requests: a hub that answers "../../x" as its sha
    # must not steer a file outside the store.
    if not info.sha or not _COMMIT.fullmatch(info.sha):
        raise DownloadFailed(f"The Hub answered '{repo_id}' with an invalid commit id; refusing to download it")
    return RepoFiles(repo_id, info.sha, tuple(sorted(names)), weights, sum(s.size or 0 for s in siblings))


def target_folder(models_dir: Path, repo_id: str) -> Path:
    org, name = repo_id.split("/")
    return models_dir / org / name


def pull(spec: str, models_dir: Path, gate: Optional[MemoryGate] = None, max_store_bytes: Optional[int] = None,
         in_use: Callable[[Path], bool] = lambda path: False, timeout_s: float = DOWNLOAD_TIMEOUT_S,
         gguf_file: Optional[str] = None) -> Pulled:
    """Download `ORG/NAME[@REVISION][:QUANT]` into the store (see the module docstring for the
    checks). With `max_store_bytes`, downloaded models nobody has used for longest (and that
    `in_use` does not claim) are removed first to make room; a model that can't fit is a 507.
    `gguf_file`: the GGUF file of the repo to fetch (else `:QUANT` picks it)."""
    from huggingface_hub import hf_hub_download

    spec, quant = split_quantization(spec)
    repo_id, revision = parse_spec(spec)
    started = time.monotonic()
    if not _LOCK.acquire(timeout=timeout_s):
        raise DownloadFailed(f"Another download held the line for {timeout_s:g} s; try '{repo_id}' again later")
    try:
        repo = repo_files(repo_id, revision, gguf_file or quant)
        if repo.gguf:
            return _pull_gguf(repo, models_dir, gate, max_store_bytes, in_use, timeout_s, revision, started)
        free = shutil.disk_usage(_existing(models_dir)).free
        if repo.total_bytes > free:
            raise EngineError(f"'{repo_id}' needs {repo.total_bytes / 2**30:.1f} GiB of disk; "
                              f"{free / 2**30:.1f} GiB is free in {models_dir}", code="insufficient_storage",
                              status=507)
        if max_store_bytes is not None:
            make_room(models_dir, repo.total_bytes, max_store_bytes, in_use, keep=target_folder(models_dir, repo_id))
        if gate is not None:  # the weights as shipped must fit in memory, or there is no point
            gate.check(repo_id, MemoryEstimate(repo.weight_bytes, 0))
        staging = models_dir / ".downloads" / repo_id.replace("/", "--")
        # Exactly the listed files, by name (a pattern list would let a file named "*.safetensors"
        # pull every sub-folder's weights): the small ones first, to check the architecture.
        small = [f for f in repo.files if not f.endswith(".safetensors")]
        weights = [f for f in repo.files if f.endswith(".safetensors")]
        log.info("downloading %s@%s: %d files, %.1f MiB", repo_id, repo.revision[:12], len(repo.files),
                 repo.total_bytes / 2**20)
        with _hub_errors(repo_id) as guard, hub_transfer.limited(repo_id, repo.total_bytes, timeout_s) as limits:
            guard.limits = limits
            for name in small:
                hf_hub_download(repo_id, name, revision=repo.revision, local_dir=staging, endpoint=_endpoint())
            problem = config_problem(staging)
            if problem:
                shutil.rmtree(staging, ignore_errors=True)
                raise Unsupported(f"'{repo_id}' can't be served here: {problem}")
            for name in weights:
                hf_hub_download(repo_id, name, revision=repo.revision, local_dir=staging, endpoint=_endpoint())
        result = probe(staging)
        if not result.runnable:
            shutil.rmtree(staging, ignore_errors=True)
            raise Unsupported(f"'{repo_id}' was downloaded but can't be served: {result.reason}")
        shutil.rmtree(staging / ".cache", ignore_errors=True)  # huggingface_hub's resume bookkeeping
        (staging / PULLED_MARK).write_text(json.dumps({"repo_id": repo_id, "revision": revision,
                                                       "commit": repo.revision}))
        final = target_folder(models_dir, repo_id)
        final.parent.mkdir(parents=True, exist_ok=True)
        if final.exists():  # another revision: replaced whole
            shutil.rmtree(final)
        staging.rename(final)
    finally:
        _LOCK.release()
    seconds = time.monotonic() - started
    log.info("downloaded %s in %.1f s to %s", repo_id, seconds, final)
    return Pulled(repo_id, final, probe(final), seconds)


def _pull_gguf(repo: RepoFiles, models_dir: Path, gate: Optional[MemoryGate], max_store_bytes: Optional[int],
               in_use: Callable[[Path], bool], timeout_s: float, revision: Optional[str], started: float) -> Pulled:
    """Fetch a repo's one GGUF file, convert it into `models/ORG/NAME`, and drop the download
    (the caller holds the download lock)."""
    from huggingface_hub import hf_hub_download

    from engine.models.gguf_import import import_gguf

    repo_id, (name,) = repo.repo_id, repo.files
    free = shutil.disk_usage(_existing(models_dir)).free
    if 2 * repo.total_bytes > free:  # the file, and the store folder converted from it
        raise EngineError(f"'{repo_id}' ({name}) needs {2 * repo.total_bytes / 2**30:.1f} GiB of disk to download "
                          f"and convert; {free / 2**30:.1f} GiB is free in {models_dir}", code="insufficient_storage",
                          status=507)
    if max_store_bytes is not None:
        make_room(models_dir, 2 * repo.total_bytes, max_store_bytes, in_use, keep=target_folder(models_dir, repo_id))
    if gate is not None:
        gate.check(repo_id, MemoryEstimate(repo.weight_bytes, 0))
    staging = models_dir / ".downloads" / repo_id.replace("/", "--")
    log.info("downloading %s@%s: %s, %.1f MiB", repo_id, repo.revision[:12], name, repo.total_bytes / 2**20)
    with _hub_errors(repo_id) as guard, hub_transfer.limited(repo_id, repo.total_bytes, timeout_s) as limits:
        guard.limits = limits
        hf_hub_download(repo_id, name, revision=repo.revision, local_dir=staging, endpoint=_endpoint())
    final = target_folder(models_dir, repo_id)

    def quota(plan) -> None:  # the converted size, known from the file's header, before converting
        if max_store_bytes is not None:
            make_room(models_dir, plan.converted_bytes, max_store_bytes, in_use, keep=final)

    try:
        folder = import_gguf(staging / name, models_dir, name=repo_id, gate=gate, check=quota)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        _remove_if_empty(staging.parent)
    result = probe(folder)
    if not result.runnable:
        shutil.rmtree(folder, ignore_errors=True)
        raise Unsupported(f"'{repo_id}' ({name}) was converted but can't be served: {result.reason}")
    (final / PULLED_MARK).write_text(json.dumps({"repo_id": repo_id, "revision": revision, "commit": repo.revision,
                                                 "file": name}))
    seconds = time.monotonic() - started
    log.info("downloaded and converted %s (%s) in %.1f s to %s", repo_id, name, seconds, final)
    return Pulled(repo_id, final, result, seconds)


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def mark_used(folder: Path) -> None:
    """Note that a downloaded model was just loaded (the quota evicts the least recently used)."""
    if (folder / PULLED_MARK).exists():
        try:
            (folder / USED_MARK).touch()
        except OSError:
            pass


def make_room(models_dir: Path, needed: int, max_store_bytes: int, in_use: Callable[[Path], bool],
              keep: Optional[Path] = None) -> list[Path]:
    """Remove downloaded models, least recently used first, until `needed` more bytes fit under
    `max_store_bytes`; a 507 when even that is not enough. Returns what was removed."""
    used = folder_bytes(models_dir) if models_dir.exists() else 0
    if used + needed <= max_store_bytes:
        return []
    candidates = []
    for mark in models_dir.glob(f"*/*/{PULLED_MARK}"):
        folder = mark.parent
        if folder == keep or in_use(folder):
            continue
        stamp = folder / USED_MARK
        candidates.append(((stamp if stamp.exists() else mark).stat().st_mtime, folder))
    removed = []
    for _, folder in sorted(candidates):
        if used + needed <= max_store_bytes:
            break
        size = folder_bytes(folder)
        _delete_from_store(folder, models_dir, ignore_errors=True)
        used -= size
        removed.append(folder)
        log.info("store quota: removed %s (%.1f MiB, least recently used)", folder, size / 2**20)
    if used + needed > max_store_bytes:
        raise EngineError(f"The model needs {needed / 2**20:.1f} MiB and the store holds {used / 2**20:.1f} MiB of "
                          f"its {max_store_bytes / 2**20:.1f} MiB quota (--max-store-bytes) in models it can't remove",
                          code="insufficient_storage", status=507)
    return removed


def remove(model_id: str, models_dir: Path, hf_cache: Optional[Path] = None) -> list[Path]:
    """Delete a pulled or converted model from the store, or a repo from the Hugging Face cache;
    returns what was deleted (ModelNotFound when nothing is)."""
    from engine.models.resolution import ModelStore

    entry = ModelStore(models_dir, hf_cache).resolve(model_id)
    if entry.source == "store":
        _delete_from_store(entry.path, models_dir)
        return [entry.path]
    from huggingface_hub import scan_cache_dir

    info = scan_cache_dir(hf_cache)
    repos = [r for r in info.repos if r.repo_id == entry.id and r.repo_type == "model"]
    if not repos:
        raise ModelNotFound(model_id, hint="Only models in openmlx's store or the Hugging Face cache can be removed.")
    info.delete_revisions(*[rev.commit_hash for r in repos for rev in r.revisions]).execute()
    return [r.repo_path for r in repos]


def _delete_from_store(folder: Path, models_dir: Path, ignore_errors: bool = False) -> None:
    """A model's folder, and its ORG folder when that held only this model."""
    shutil.rmtree(folder, ignore_errors=ignore_errors)
    if folder.parent != models_dir and not any(folder.parent.iterdir()):
        folder.parent.rmdir()


def _remove_if_empty(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:  # not empty (another download's resume data) or gone
        pass


def _existing(path: Path) -> Path:
    while not path.exists():
        path = path.parent
    return path


class _hub_errors:
    """huggingface_hub's exceptions as engine errors a client (or the CLI) can act on."""

    def __init__(self, repo_id: str) -> None:
        self.repo_id = repo_id
        self.limits: Optional[hub_transfer.TransferLimits] = None

    def __enter__(self) -> "_hub_errors":
        return self

    def __exit__(self, kind, error, tb) -> bool:
        from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, OfflineModeIsEnabled,
                                            RepositoryNotFoundError, RevisionNotFoundError)

        if error is None or isinstance(error, EngineError):
            return False
        repo = self.repo_id
        if self.limits is not None and self.limits.refusal:  # huggingface_hub may have wrapped our refusal
            log.warning("download of %s cut off: %s", repo, self.limits.refusal)
            raise DownloadFailed(f"Downloading '{repo}' was stopped: {self.limits.refusal}") from None
        if isinstance(error, GatedRepoError):
            raise ModelAccessDenied(f"'{repo}' is gated or private on the Hugging Face Hub: accept its terms "
                                    f"there and set HF_TOKEN for the server") from None
        if isinstance(error, RevisionNotFoundError):
            raise ModelNotFound(repo, hint="That revision does not exist on the Hugging Face Hub.") from None
        if isinstance(error, RepositoryNotFoundError):
            raise ModelNotFound(repo, hint="No such model repo on the Hugging Face Hub (or it is private: "
                                           "set HF_TOKEN).") from None
        if isinstance(error, OfflineModeIsEnabled):
            raise DownloadFailed(f"'{repo}' is not in the store and HF_HUB_OFFLINE is set, so it can't be "
                                 f"downloaded") from None
        if isinstance(error, (HfHubHTTPError, Exception)):  # the network, the Hub, httpx: run again to resume
            log.warning("download of %s failed: %r", repo, error)
            raise DownloadFailed(f"Downloading '{repo}' from the Hugging Face Hub failed ({error.__class__.__name__}); "
                                 f"run it again to resume") from None
        return False
