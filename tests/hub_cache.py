"""A Hugging Face hub cache built from local model folders, for tests that name models by hub id.

``huggingface_hub`` has no public call that adds local files to its cache, so this writes the layout
its documentation describes (``models--org--name/{blobs,snapshots/<commit>,refs/<name>}``, snapshot
files linked to content-addressed blobs) with the folder name from the library's own
``repo_folder_name``; the tests then check that the library's ``scan_cache_dir`` reads it back.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path


def add_to_hub_cache(cache: Path, repo_id: str, model_dir: Path, commit: str, refs: Sequence[str] = ()) -> Path:
    """Every file of ``model_dir`` as revision ``commit`` of model ``repo_id`` in ``cache``, each of ``refs``
    (branches or tags) pointing at it; returns the snapshot directory."""
    from huggingface_hub.file_download import repo_folder_name

    repo = cache / repo_folder_name(repo_id=repo_id, repo_type="model")
    snapshot = repo / "snapshots" / commit
    for f in sorted(p for p in model_dir.rglob("*") if p.is_file()):
        data = f.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / f.relative_to(model_dir)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    for ref in refs:
        (repo / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    return snapshot
