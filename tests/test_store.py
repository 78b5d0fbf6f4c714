"""The run store: caching, idempotent candidates, crash resume, one writer, schema and config checks."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from hm3 import store as store_module
from hm3.errors import ConfigError, StoreError, StoreLockedError
from hm3.store import STORE_FILE, RunStore, config_differences, example_set_key

CONFIG = {"search": {"budget": 20, "objectives": ["zoo:math", "zoo:code"]}, "merge": {"method": "ties"}}


def _child(script: str, run_dir: Path) -> subprocess.Popen:
    """A real second process running ``script`` against ``run_dir``, talking over pipes."""
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(script), str(run_dir)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_evaluate_cached_computes_once_per_example_set(tmp_path: Path) -> None:
    calls: list[str] = []

    def compute(tag: str, score: float):
        return lambda: (calls.append(tag), (score, 3))[1]

    with RunStore.open(tmp_path, config=CONFIG, seed=1) as store:
        cand = store.add_candidate({"weights": [0.3, 0.7]}, "merge")
        first = store.evaluate_cached(cand, "zoo:math", "validation", ["e2", "e1", "e3"], compute("a", 0.5))
        again = store.evaluate_cached(cand, "zoo:math", "validation", ["e3", "e1", "e2"], compute("b", 0.9))
        other_set = store.evaluate_cached(cand, "zoo:math", "validation", ["e1", "e4"], compute("c", 0.25))
        other_split = store.evaluate_cached(cand, "zoo:math", "test", ["e1", "e2", "e3"], compute("d", 0.75))
    assert calls == ["a", "c", "d"]
    assert again == first and first.score == 0.5 and first.count == 3
    assert first.example_ids == ("e1", "e2", "e3")
    assert (other_set.score, other_split.score) == (0.25, 0.75)

    with RunStore.open(tmp_path) as store:  # the cache survives closing and reopening
        cached = store.evaluate_cached(
            cand.id, "zoo:math", "validation", ["e1", "e2", "e3"], compute("e", 0.0)
        )
        assert cached.score == 0.5 and calls == ["a", "c", "d"]
        assert len(store.evaluations(objective="zoo:math")) == 3
        assert [e.split for e in store.evaluations(split="test")] == ["test"]


def test_example_set_key_ignores_order_but_not_content() -> None:
    assert example_set_key([3, 1, 2]) == example_set_key([1, 2, 3])
    assert example_set_key([1, 2, 3]) != example_set_key([1, 2])
    assert example_set_key(["1"]) != example_set_key([1])


def test_candidates_are_idempotent_by_content(tmp_path: Path) -> None:
    with RunStore.open(tmp_path) as store:
        a = store.add_candidate({"method": "ties", "weights": {"m1": 0.5, "m2": 0.25}}, "merge")
        same = store.add_candidate({"weights": {"m2": 0.25, "m1": 0.5}, "method": "ties"}, "merge")
        b = store.add_candidate({"method": "ties", "weights": {"m1": 0.5, "m2": 0.26}}, "merge")
        path = store.add_candidate({"layers": [[0, 1], [2, 1]]}, "path")
        assert a == same and a.id != b.id != path.id
        with pytest.raises(StoreError, match="already stored as a 'merge'"):
            store.add_candidate({"method": "ties", "weights": {"m1": 0.5, "m2": 0.25}}, "path")
    with RunStore.open(tmp_path) as store:
        assert store.add_candidate({"weights": {"m1": 0.5, "m2": 0.25}, "method": "ties"}, "merge") == a
        assert [c.kind for c in store.candidates()] == ["merge", "merge", "path"]
        assert store.candidates("path") == [path]
        ref, recipe = store.candidate(path.id)
        assert ref == path and recipe == {"layers": [[0, 1], [2, 1]]}
    with RunStore.open(tmp_path, readonly=True) as store:  # found by content, key order aside, without writing
        assert store.find_candidate({"weights": {"m2": 0.25, "m1": 0.5}, "method": "ties"}) == a
        assert store.find_candidate({"layers": [[0, 1], [2, 1]]}) == path
        assert store.find_candidate({"layers": [[0, 1]]}) is None


def test_recorded_evaluations_are_immutable(tmp_path: Path) -> None:
    with RunStore.open(tmp_path) as store:
        cand = store.add_candidate({"x": 1}, "merge")
        first = store.record_evaluation(cand, "o", "validation", [1, 2], score=0.4, count=2, seconds=1.0)
        second = store.record_evaluation(cand, "o", "validation", [2, 1], score=0.9, count=2, seconds=1.0)
        assert second == first and len(store.evaluations()) == 1


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"score": float("nan"), "count": 1}, "scores must be finite"),
        ({"score": 0.5, "count": -1}, "negative"),
    ],
)
def test_bad_evaluations_are_refused(tmp_path: Path, kwargs: dict, message: str) -> None:
    with RunStore.open(tmp_path) as store:
        cand = store.add_candidate({"x": 1}, "merge")
        with pytest.raises(StoreError, match=message):
            store.record_evaluation(cand, "o", "validation", [1], seconds=0.0, **kwargs)


def test_bad_example_ids_and_unknown_candidates_are_refused(tmp_path: Path) -> None:
    with RunStore.open(tmp_path) as store:
        cand = store.add_candidate({"x": 1}, "merge")
        with pytest.raises(StoreError, match="at least one example id"):
            store.get_evaluation(cand, "o", "validation", [])
        with pytest.raises(StoreError, match="1.5"):
            store.get_evaluation(cand, "o", "validation", [1.5])
        with pytest.raises(StoreError, match="candidate 99"):
            store.record_evaluation(99, "o", "validation", [1], score=0.1, count=1, seconds=0.0)
        with pytest.raises(StoreError, match="cannot be stored as JSON"):
            store.add_candidate({"tensor": object()}, "merge")


def test_events_round_trip(tmp_path: Path) -> None:
    with RunStore.open(tmp_path) as store:
        store.add_event("progress", {"iteration": 1})
        store.add_event("checkpoint", {"subsets": {"epoch": 0, "position": 3}})
        store.add_event("progress", {"iteration": 2})
    with RunStore.open(tmp_path, readonly=True) as store:
        assert [e.payload["iteration"] for e in store.events("progress")] == [1, 2]
        assert store.last_event("checkpoint").payload == {"subsets": {"epoch": 0, "position": 3}}
        assert store.last_event("missing") is None


def test_events_added_together_are_committed_all_or_none(tmp_path: Path) -> None:
    """A batch's tells are one transaction: a failure on the second leaves the first unwritten too."""
    with RunStore.open(tmp_path) as store:
        added = store.add_events("tell", [{"i": 0}, {"i": 1}])
        assert [e.payload for e in store.events("tell")] == [{"i": 0}, {"i": 1}] == [e.payload for e in added]
        assert [e.id for e in added] == [e.id for e in store.events("tell")]
        with sqlite3.connect(tmp_path / STORE_FILE) as conn:  # a second insert that fails inside the batch
            conn.execute("CREATE TRIGGER refuse BEFORE INSERT ON events WHEN NEW.payload_json LIKE '%boom%' "
                         "BEGIN SELECT RAISE(ABORT, 'boom'); END")
        with pytest.raises(sqlite3.DatabaseError, match="boom"):
            store.add_events("tell", [{"i": 2}, {"boom": 3}])
        assert [e.payload["i"] for e in store.events("tell")] == [0, 1]


def test_run_record_holds_config_seed_and_versions(tmp_path: Path) -> None:
    with RunStore.open(tmp_path, config=CONFIG, seed=7) as store:
        assert store.config() == CONFIG and store.seed() == 7
        assert store.packages()["torch"] is not None and "vllm" in store.packages()
        assert store.meta()["schema_version"] == str(store_module.SCHEMA_VERSION)
    row = sqlite3.connect(tmp_path / STORE_FILE).execute("SELECT config_hash FROM run").fetchone()
    assert row[0] == store_module.content_hash(CONFIG)


def test_resume_with_a_different_config_names_the_keys(tmp_path: Path) -> None:
    RunStore.open(tmp_path, config=CONFIG, seed=1).close()
    reordered = {
        "merge": {"method": "ties"},
        "search": {"objectives": ["zoo:math", "zoo:code"], "budget": 20},
    }
    RunStore.open(tmp_path, config=reordered, seed=1).close()  # same config, other key order: fine

    changed = {"search": {"budget": 40, "objectives": ["zoo:math", "zoo:translation"]}, "seed_note": "x"}
    with pytest.raises(ConfigError) as err:
        RunStore.open(tmp_path, config=changed)
    message = str(err.value)
    for fragment in (
        "search.budget: 20 -> 40",
        'search.objectives[1]: "zoo:code" -> "zoo:translation"',
        'merge: {"method": "ties"} -> (removed)',
        'seed_note: (absent) -> "x"',
        str(tmp_path),
    ):
        assert fragment in message
    with pytest.raises(ConfigError, match="seed 1, not 2"):
        RunStore.open(tmp_path, seed=2)
    RunStore.open(tmp_path, config=CONFIG, seed=1).close()  # the failed opens released the lock


def test_config_differences_on_lists_of_other_length() -> None:
    assert config_differences({"a": [1, 2]}, {"a": [1, 2, 3]}) == ["a: [1, 2] -> [1, 2, 3]"]
    assert config_differences({"a": True}, {"a": 1}) == ["a: true -> 1"]


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    RunStore.open(tmp_path).close()
    newer = store_module.SCHEMA_VERSION + 1
    with sqlite3.connect(tmp_path / STORE_FILE) as conn:
        conn.execute("UPDATE meta SET value=? WHERE key='schema_version'", (str(newer),))
    for readonly in (False, True):
        with pytest.raises(StoreError) as err:
            RunStore.open(tmp_path, readonly=readonly)
        assert str(tmp_path / STORE_FILE) in str(err.value)
        assert f"schema version {newer}, newer than this hm3's {store_module.SCHEMA_VERSION}" in str(
            err.value
        )
    RunStore.open(tmp_path / "fresh").close()  # and the refusal left no lock behind on other runs


def test_older_schema_is_migrated_or_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    RunStore.open(tmp_path).close()
    monkeypatch.setattr(store_module, "SCHEMA_VERSION", store_module.SCHEMA_VERSION + 1)
    with pytest.raises(StoreError, match=r"older than this hm3's \d+, .*\(no migration path\)"):
        RunStore.open(tmp_path)

    def add_notes(conn: sqlite3.Connection) -> None:
        conn.execute("ALTER TABLE candidates ADD COLUMN notes TEXT")

    monkeypatch.setitem(store_module.MIGRATIONS, store_module.SCHEMA_VERSION - 1, add_notes)
    with pytest.raises(StoreError, match="read-only opens do not migrate"):
        RunStore.open(tmp_path, readonly=True)
    with RunStore.open(tmp_path) as store:
        assert store.meta()["schema_version"] == str(store_module.SCHEMA_VERSION)
    columns = [r[1] for r in sqlite3.connect(tmp_path / STORE_FILE).execute("PRAGMA table_info(candidates)")]
    assert "notes" in columns


def test_missing_and_foreign_files_are_refused(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="no run store at"):
        RunStore.open(tmp_path / "absent", readonly=True)
    with pytest.raises(StoreError, match="no run store at"):
        RunStore.open(tmp_path / "absent", create=False)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / STORE_FILE).write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StoreError, match="junk"):
        RunStore.open(tmp_path / "junk")
    other = tmp_path / "other"
    other.mkdir()
    with sqlite3.connect(other / STORE_FILE) as conn:
        conn.execute("CREATE TABLE t (x)")
    with pytest.raises(StoreError, match="not an hm3 run store"):
        RunStore.open(other)


def test_readonly_store_cannot_write(tmp_path: Path) -> None:
    RunStore.open(tmp_path).close()
    with RunStore.open(tmp_path, readonly=True) as store, pytest.raises(StoreError, match="read-only"):
        store.add_candidate({"x": 1}, "merge")


WRITER_LOOP = """
    import sys
    from hm3.store import RunStore
    with RunStore.open(sys.argv[1], config={"k": 1}, seed=0) as store:
        for i in range(100_000):
            cand = store.add_candidate({"i": i}, "merge")
            store.record_evaluation(cand, "obj", "validation", [f"ex{i}"], score=i / 1e5, count=1, seconds=0.0)
            print(i, flush=True)
"""


def test_resume_after_kill_9_keeps_every_committed_evaluation(tmp_path: Path) -> None:
    child = _child(WRITER_LOOP, tmp_path)
    reported = []
    try:
        for line in child.stdout:
            reported.append(int(line))
            if len(reported) == 30:
                break
        assert len(reported) == 30, child.stderr.read()
        os.kill(child.pid, signal.SIGKILL)  # mid-loop: usually between add_candidate and its commit
    finally:
        child.kill()
        child.wait()
    assert child.returncode == -signal.SIGKILL

    with sqlite3.connect(tmp_path / STORE_FILE) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)

    def must_not_run():
        raise AssertionError("a committed evaluation was recomputed")

    # The dead writer's flock went with it: the run reopens for writing at once.
    with RunStore.open(tmp_path, config={"k": 1}, seed=0) as store:
        stored = store.evaluations()
        stored_ids = [e.example_ids[0] for e in stored]
        assert stored_ids == [f"ex{i}" for i in range(len(stored))]  # a gap-free prefix, in commit order
        assert len(stored) >= 30
        assert all(e.score == i / 1e5 for i, e in enumerate(stored))
        for i in reported:
            cand = store.add_candidate({"i": i}, "merge")
            store.evaluate_cached(cand, "obj", "validation", [f"ex{i}"], must_not_run)
        # At most one candidate was in flight without its evaluation.
        assert len(store.candidates()) - len(stored) in (0, 1)
        # The run goes on: the next evaluation is computed and committed.
        nxt = store.add_candidate({"i": len(stored)}, "merge")
        fresh = store.evaluate_cached(nxt, "obj", "validation", [f"ex{len(stored)}"], lambda: (0.5, 1))
        assert fresh.score == 0.5


HOLDER = """
    import sys
    from hm3.store import RunStore
    with RunStore.open(sys.argv[1]) as store:
        cand = store.add_candidate({"held": True}, "merge")
        store.record_evaluation(cand, "obj", "test", [1, 2], score=0.75, count=2, seconds=0.1)
        print("ready", flush=True)
        sys.stdin.read()  # hold the store until the parent closes our stdin
"""


def test_second_writer_is_refused_and_readers_are_not(tmp_path: Path) -> None:
    child = _child(HOLDER, tmp_path)
    try:
        assert child.stdout.readline().strip() == "ready", child.stderr.read()
        with pytest.raises(StoreLockedError) as err:
            RunStore.open(tmp_path)
        message = str(err.value)
        assert f"HM3 store lock ({tmp_path / 'hm3.lock'}) held by pid {child.pid} on host" in message
        assert "since" in message and "read-only" in message

        with (
            RunStore.open(tmp_path, readonly=True) as reader,
            RunStore.open(tmp_path, readonly=True) as other,
        ):
            assert [e.score for e in reader.evaluations()] == [0.75]
            assert other.candidates()[0].kind == "merge"
    finally:
        child.stdin.close()
        child.wait(timeout=30)
    assert child.returncode == 0, child.stderr.read()
    with RunStore.open(tmp_path) as store:  # released on the holder's normal exit
        assert len(store.evaluations()) == 1


def test_second_writer_in_the_same_process_is_refused(tmp_path: Path) -> None:
    with RunStore.open(tmp_path), pytest.raises(StoreLockedError, match=f"pid {os.getpid()}"):
        RunStore.open(tmp_path)


def test_store_json_is_canonical(tmp_path: Path) -> None:
    with RunStore.open(tmp_path) as store:
        cand = store.add_candidate({"b": 1, "a": (1, 2)}, "merge")
    recipe_json = (
        sqlite3.connect(tmp_path / STORE_FILE).execute("SELECT recipe_json FROM candidates").fetchone()[0]
    )
    assert recipe_json == '{"a":[1,2],"b":1}'
    assert cand.content_hash == store_module.hashlib.sha256(recipe_json.encode()).hexdigest()
    assert json.loads(recipe_json) == {"a": [1, 2], "b": 1}


@pytest.mark.parametrize("content", [b"", None])
def test_an_empty_store_file_is_refused_not_restarted(tmp_path: Path, content: bytes | None) -> None:
    """A zero-byte file, or an SQLite database without hm3's tables, holds no run: refused by every
    open (a writable one would otherwise create a new run in its place)."""
    path = tmp_path / STORE_FILE
    if content is None:
        sqlite3.connect(path).close()  # an empty database (0 bytes too, but created by SQLite)
    else:
        path.write_bytes(content)
    for kwargs in ({}, {"readonly": True}, {"config": CONFIG, "seed": 1}):
        with pytest.raises(StoreError, match="is empty .* holds no run") as err:
            RunStore.open(tmp_path, **kwargs)
        assert str(path) in str(err.value)
    assert path.stat().st_size == 0  # nothing was written into it
    RunStore.open(tmp_path / "fresh", config=CONFIG, seed=1).close()  # a new directory still starts a run


@pytest.mark.parametrize("value", ["one", "", "1.5x"])
def test_a_malformed_schema_version_is_refused(tmp_path: Path, value: str) -> None:
    RunStore.open(tmp_path).close()
    with sqlite3.connect(tmp_path / STORE_FILE) as conn:
        conn.execute("UPDATE meta SET value=? WHERE key='schema_version'", (value,))
    for readonly in (False, True):
        with pytest.raises(StoreError, match=f"schema_version is {value!r}, not a version number"):
            RunStore.open(tmp_path, readonly=readonly)


def test_an_event_missing_a_field_is_refused(tmp_path: Path) -> None:
    with RunStore.open(tmp_path) as store:
        store.add_event("level1_tell", {"candidate": 1, "x": [0.5]})
        bad = store.add_event("level1_tell", {"candidate": 2})
        assert len(store.events("level1_tell", fields=("candidate",))) == 2
        with pytest.raises(StoreError, match=rf"level1_tell event {bad.id} lacks 'x'"):
            store.events("level1_tell", fields=("candidate", "x"))
    with sqlite3.connect(tmp_path / STORE_FILE) as conn:
        conn.execute("UPDATE events SET payload_json='{not json' WHERE id=?", (bad.id,))
    with RunStore.open(tmp_path, readonly=True) as store, pytest.raises(StoreError, match="holds no valid JSON"):
        store.events()
    with RunStore.open(tmp_path, readonly=True) as store, pytest.raises(StoreError, match="holds no valid JSON"):
        store.last_event("level1_tell")  # what a resumed search reads its budget from
