"""Model references: a local directory, or a Hugging Face hub id resolved through the local HF cache.

A recipe or run config names a model as mergekit does: a directory, or ``org/name`` /
``org/name@revision`` (a branch, tag or commit). A local directory always wins, so a folder that
happens to be called ``org/name`` is read as it is. A hub id goes through ``huggingface_hub``'s own
``snapshot_download``, which knows the cache's layout (``refs/``, ``snapshots/``, partial
snapshots): with ``HF_HUB_OFFLINE`` set only the cache is read, otherwise a missing snapshot is
downloaded. The environment is read when a reference is resolved, not when ``huggingface_hub`` was
imported, so ``HF_HUB_CACHE``/``HF_HOME``/``HF_HUB_OFFLINE`` set by a caller afterwards still apply.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from hm3.errors import ConfigError

#: What a download fetches: weights as safetensors (what hm3 reads), configs, index and tokenizer
#: files. Not ``*.bin``, ``*.gguf``, ``*.onnx``…, which hubs often hold next to the safetensors.
HUB_FILES = (
    "*.safetensors",
    "*.json",
    "tokenizer.model",
    "spiece.model",
    "merges.txt",
    "vocab.txt",
    "chat_template.jinja",
)


@dataclass(frozen=True)
class HubRef:
    """``repo_id`` at ``revision`` (None: the hub's default branch, ``main``)."""

    repo_id: str
    revision: str | None = None

    def __str__(self) -> str:
        return f"{self.repo_id}@{self.revision}" if self.revision else self.repo_id


def parse_hub_ref(ref: str) -> HubRef | None:
    """``ref`` as a hub id (``org/name`` or ``org/name@revision``, mergekit's syntax), or None when it is
    not shaped like one (an absolute or dotted path, more than one ``/``, a name the hub forbids)."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    repo_id, at, revision = ref.partition("@")
    if repo_id.count("/") != 1 or (at and not revision) or "@" in revision:
        return None
    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        return None
    return HubRef(repo_id, revision or None)


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").upper() in {"1", "ON", "YES", "TRUE"}


def hub_cache_dir() -> Path:
    """The hub cache ``huggingface_hub`` would use with the environment as it is now:
    ``HF_HUB_CACHE``, else ``HUGGINGFACE_HUB_CACHE``, else ``HF_HOME/hub``, else the library's default."""
    from huggingface_hub import constants

    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(name):
            return Path(os.path.expandvars(os.environ[name])).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.path.expandvars(os.environ["HF_HOME"])).expanduser() / "hub"
    return Path(constants.HF_HUB_CACHE)


def downloads_allowed() -> bool:
    """False when ``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) is set now or was when
    ``huggingface_hub`` was imported (it then refuses every request itself)."""
    from huggingface_hub import constants

    return not (_env_true("HF_HUB_OFFLINE") or _env_true("TRANSFORMERS_OFFLINE") or constants.HF_HUB_OFFLINE)


def _cached_revisions(cache: Path, repo_id: str) -> list[str] | None:
    """The revisions of ``repo_id`` in ``cache`` as ``ref -> commit`` / ``commit`` lines, per
    ``scan_cache_dir``; None when the cache holds no copy of the model."""
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    try:
        info = scan_cache_dir(cache)
    except (CacheNotFound, OSError):
        return None
    for repo in info.repos:
        if repo.repo_type == "model" and repo.repo_id == repo_id:
            return sorted(
                ", ".join(f"{r} -> {rev.commit_hash[:12]}" for r in sorted(rev.refs)) or rev.commit_hash[:12]
                for rev in repo.revisions
            )
    return None


def resolve_hub_model(hub: HubRef, *, tried: Sequence[Path] = ()) -> Path:
    """The snapshot directory of ``hub`` in the local HF cache, downloaded first where that is allowed.

    ``tried`` (the local paths looked at before) goes into the error, so a user sees every place
    hm3 looked and whether it could have downloaded.
    """
    from huggingface_hub import errors, snapshot_download

    cache = hub_cache_dir()
    online = downloads_allowed()
    revision = hub.revision or "main"
    looked = f"no local directory {', '.join(str(p) for p in tried)}; " if tried else ""
    mode = "downloading was allowed" if online else "downloading is off (HF_HUB_OFFLINE)"
    try:
        path = snapshot_download(hub.repo_id, revision=hub.revision, cache_dir=cache, local_files_only=not online,
                                 allow_patterns=list(HUB_FILES))
    except errors.RevisionNotFoundError:
        raise ConfigError(f"model {str(hub)!r}: revision {revision!r} does not exist on the hub for "
                          f"{hub.repo_id!r}") from None
    except errors.RepositoryNotFoundError:
        raise ConfigError(f"model {str(hub)!r} not found: {looked}the hub has no model {hub.repo_id!r} "
                          f"(or it is private or gated); HF cache {cache}; {mode}") from None
    except (errors.LocalEntryNotFoundError, errors.HFValidationError, OSError) as err:
        cached = _cached_revisions(cache, hub.repo_id)
        if isinstance(err, getattr(errors, "IncompleteSnapshotError", ())):
            problem = f"its snapshot at revision {revision!r} in the HF cache {cache} is incomplete"
        elif cached is not None:
            problem = (f"the HF cache {cache} holds {hub.repo_id!r} but not at revision {revision!r} "
                       f"(cached: {'; '.join(cached)})")
        else:
            problem = f"not in the HF cache {cache}"
        first_line = next(iter(str(err).splitlines()), "")
        reason = f" ({type(err).__name__}: {first_line})" if online else ""
        raise ConfigError(f"model {str(hub)!r} not found: {looked}{problem}; {mode}{reason}") from None
    return Path(path)


def _local_candidates(ref: str, config_dir: Path | None) -> list[Path]:
    local = [Path(ref).expanduser()]
    if config_dir is not None and not local[0].is_absolute():
        local.append(config_dir / ref)
    return local


def is_hub_name(ref: str, config_dir: Path | None = None) -> bool:
    """Whether ``ref`` is read from the hub: shaped like a hub id, and no local path of that name exists
    (relative to the CWD or to ``config_dir``)."""
    return parse_hub_ref(ref) is not None and not any(p.exists() for p in _local_candidates(ref, config_dir))


def resolve_model(ref: str, config_dir: Path | None = None) -> Path:
    """A model reference as a directory: ``ref`` itself (relative to the CWD), then relative to
    ``config_dir`` (the recipe's or run config's folder), then as a hub id through the HF cache."""
    local = _local_candidates(ref, config_dir)
    for candidate in local:
        if candidate.exists():
            return candidate
    hub = parse_hub_ref(ref)
    if hub is None:
        raise ConfigError(f"model {ref!r} not found (looked in {', '.join(str(c) for c in local)}); it is not "
                          "a hub id either (org/name or org/name@revision)")
    return resolve_hub_model(hub, tried=local)
