#!/usr/bin/env python
"""Mutation testing (mutmut) of the modules where a silent error costs users most, one module at a time.

    nice -n 15 .venv/bin/python scripts/mutation.py                      # every module below
    nice -n 15 .venv/bin/python scripts/mutation.py hm3/merge/ops.py     # one (or a few)

Each module is mutated alone, in its own staging copy of the commit checked out (``.mutation/<name>/``, kept
for ``cd .mutation/<name> && mutmut show|browse``), and each mutant runs only the tests that cover it:
those listed for the module below, narrowed by mutmut to the tests that call the mutated function.
The score is killed / (every mutant that ran); a mutant no listed test reaches counts as a survivor.
mutmut does not mutate decorated functions, so the staged module has each written as the assignment its
decorator stands for (:func:`undecorate`).
Per-module scores go to ``experiments/results/mutation_<date>_<commit>.json``. Needs the ``mutation``
extra (``pip install -e '.[dev,mutation]'``); it is not part of the test suite: it reruns tests per
mutant and takes minutes to an hour per module on a 2-core machine.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGING = ROOT / ".mutation"

#: module -> the tests that cover it (fast ones: no level-2 runs, no vLLM)
MODULES: dict[str, list[str]] = {
    "hm3/merge/ops.py": ["tests/merge/test_ops.py", "tests/merge/test_methods.py", "tests/merge/test_properties.py",
                         "tests/merge/test_mask_rng.py"],
    "hm3/merge/methods.py": ["tests/merge/test_methods.py", "tests/merge/test_properties.py",
                             "tests/merge/test_merge_cli.py", "tests/merge/test_mask_rng.py"],
    "hm3/merge/plan.py": ["tests/merge/test_plan.py", "tests/merge/test_merge_cli.py", "tests/merge/test_inmemory.py",
                          "tests/merge/test_slices.py", "tests/merge/test_tokenizers.py",
                          "tests/merge/test_mask_rng.py"],
    "hm3/search/pareto.py": ["tests/search/test_pareto.py"],
    "hm3/search/space.py": ["tests/search/test_space.py"],
    "hm3/eval/subsets.py": ["tests/eval/test_subsets.py"],
}
#: what the staged copy needs besides hm3/ (the package mutmut copies) and tests/
ALSO_COPY = ["objectives"]
#: pytest exit codes as mutmut records them (mutmut.stats.status_by_exit_code)
KILLED = {1, 3, 36, -24, 24, 152, 255, -11, -9}  # failed, errored, timed out or crashed
SURVIVED = {0, 5, 33}  # passed, or no test reached it
RECHECK_TIMEOUT_S = 600


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()


def _stage(module: str, tests: list[str], work: Path) -> str:
    """HEAD's hm3/, tests/ and objectives/ (uncommitted edits are not in it) with a [tool.mutmut] section
    for this module alone; returns the commit staged, which the results name."""
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    commit = _git("rev-parse", "--short", "HEAD")
    archive = subprocess.run(["git", "archive", commit, "hm3", "tests", *ALSO_COPY], cwd=ROOT, capture_output=True,
                             check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(work)], input=archive, check=True)
    config = {
        "source_paths": ["hm3"],
        "only_mutate": [module],
        "also_copy": ALSO_COPY,
        "pytest_add_cli_args": ["-p", "no:cacheprovider", "-q", "-o", "addopts="],
        "pytest_add_cli_args_test_selection": tests,
        "timeout_multiplier": 5.0,
    }
    lines = ["", "[tool.mutmut]"] + [f"{k} = {json.dumps(v)}" for k, v in config.items()]
    pyproject = _git("show", f"{commit}:pyproject.toml")
    (work / "pyproject.toml").write_text(pyproject + "\n" + "\n".join(lines) + "\n")
    source = work / module
    source.write_text(undecorate(source.read_text()))
    return commit


#: decorators left in place: mutmut mutates the functions under them itself
KEPT_DECORATORS = frozenset({"staticmethod", "classmethod"})


def undecorate(source: str) -> str:
    """Each decorated function (module level or in a class) rewritten as ``f = d(f)`` right after it.

    Why: mutmut leaves every decorated function unmutated (a decorator runs at definition time, and mutating
    one's arguments could raise there), so the bodies of the registered merge methods, of the search space's
    validators and of properties were never mutated. The assignment is what the decorator syntax means (the
    same objects, registered in the same order), and it lets mutmut reach the bodies; the decorators' own
    arguments stay mutated by ``--recheck``. ``staticmethod`` and ``classmethod`` directly above a ``def``
    stay (mutmut handles those), as do decorators that are not a plain name or a call of one
    (``@x.setter`` would rebind ``x`` to the bare function first).
    """
    import libcst as cst

    def rewrite(body: Sequence) -> list:
        out: list = []
        for stmt in body:
            if not isinstance(stmt, cst.FunctionDef) or not stmt.decorators:
                out.append(stmt)
                continue
            names = [_decorator_name(d) for d in stmt.decorators]
            kept = 0  # the staticmethod/classmethod decorators nearest the def
            while kept < len(names) and names[len(names) - 1 - kept] in KEPT_DECORATORS:
                kept += 1
            moved = stmt.decorators[:len(names) - kept]
            if not moved or any(_decorator_name(d) is None for d in moved):
                out.append(stmt)
                continue
            wrapped: cst.BaseExpression = stmt.name
            for decorator in reversed(moved):
                wrapped = cst.Call(func=decorator.decorator, args=[cst.Arg(wrapped)])
            out += [stmt.with_changes(decorators=stmt.decorators[len(moved):]),
                    cst.SimpleStatementLine([cst.Assign([cst.AssignTarget(stmt.name)], wrapped)])]
        return out

    class Rewrite(cst.CSTTransformer):
        def leave_IndentedBlock(self, original: cst.IndentedBlock, updated: cst.IndentedBlock) -> cst.IndentedBlock:
            return updated.with_changes(body=rewrite(updated.body))

        def leave_Module(self, original: cst.Module, updated: cst.Module) -> cst.Module:
            return updated.with_changes(body=rewrite(updated.body))

    return cst.parse_module(source).visit(Rewrite()).code


def _decorator_name(decorator) -> str | None:
    """``d`` of ``@d`` or ``@d(...)``; None for anything else (``@x.setter``, ``@mod.d``)."""
    import libcst as cst

    target = decorator.decorator.func if isinstance(decorator.decorator, cst.Call) else decorator.decorator
    return target.value if isinstance(target, cst.Name) else None


def _statuses(work: Path, module: str) -> dict[str, int | None]:
    meta = work / "mutants" / (module + ".meta")
    return json.loads(meta.read_text())["exit_code_by_key"] if meta.exists() else {}


def recheck(work: Path, module: str, survivors: list[str], tests: list[str], env: dict[str, str]) -> dict[str, int]:
    """Each survivor written into the staged source (``mutmut apply``) and the module's tests run in a fresh
    interpreter: pytest's exit code per mutant.

    Why: mutmut switches mutants on inside functions at call time, in test processes forked after the
    package was imported, so code that runs while a module imports (a decorator registering a merge
    method, the parameter specs it is given) never runs mutated there, and its mutants survive whatever
    the tests check. A fresh process imports the mutated source, as a user's would.
    """
    source = work / module
    original = source.read_text()
    mutmut = Path(sys.executable).with_name("mutmut")
    fresh = env | {"PYTHONPATH": str(work)}
    codes: dict[str, int] = {}
    try:
        for name in survivors:
            applied = subprocess.run([str(mutmut), "apply", name], cwd=work, env=env, capture_output=True)
            if applied.returncode != 0:
                codes[name] = -1  # could not be applied: stays a survivor
                continue
            try:
                proc = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider",
                                       "-o", "addopts=", *tests], cwd=work, env=fresh, capture_output=True,
                                      timeout=RECHECK_TIMEOUT_S)
                codes[name] = proc.returncode
            except subprocess.TimeoutExpired:
                codes[name] = 24  # as mutmut counts a timeout: killed
            finally:
                source.write_text(original)
    finally:
        source.write_text(original)
    return codes


def run_module(module: str, max_children: int, *, recheck_survivors: bool = False) -> dict:
    tests = MODULES[module]
    work = STAGING / Path(module).stem
    commit = _stage(module, tests, work)
    env = os.environ | {"OMP_NUM_THREADS": "1", "HM3_HYPOTHESIS_PROFILE": "mutation", "PYTHONPATH": ""}
    mutmut = Path(sys.executable).with_name("mutmut")
    start = time.perf_counter()
    proc = subprocess.run([str(mutmut), "run", "--max-children", str(max_children)], cwd=work, env=env,
                          capture_output=True, text=True)
    seconds = time.perf_counter() - start
    output = proc.stdout.replace("\r", "\n").splitlines() + proc.stderr.splitlines()
    (work / "mutmut.log").write_text("\n".join(output[-200:]) + "\n")  # progress spinner lines: only the end
    codes = _statuses(work, module)
    killed = sorted(k for k, c in codes.items() if c in KILLED)
    survived = sorted(k for k, c in codes.items() if c in SURVIVED)
    other = {k: c for k, c in codes.items() if c not in KILLED and c not in SURVIVED}
    ran = len(killed) + len(survived)
    result = {
        "module": module, "commit": commit, "date": dt.date.today().isoformat(),
        "tests": tests, "mutants": len(codes), "killed": len(killed),
        "survived": survived, "not_run": other, "score": round(len(killed) / ran, 4) if ran else None,
        "seconds": round(seconds), "mutmut_exit_code": proc.returncode,
    }
    if recheck_survivors and survived:
        start = time.perf_counter()
        rechecked = recheck(work, module, survived, tests, env)
        fresh_kills = sorted(k for k, c in rechecked.items() if c in KILLED)
        result |= {
            "killed_on_recheck": fresh_kills,
            "survived": sorted(set(survived) - set(fresh_kills)),
            "killed": len(killed) + len(fresh_kills),
            "score": round((len(killed) + len(fresh_kills)) / ran, 4),
            "recheck_seconds": round(time.perf_counter() - start),
        }
    return result


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("modules", nargs="*", help=f"default: all of {', '.join(MODULES)}")
    parser.add_argument("--max-children", type=int, default=2, help="mutants run in parallel (default 2)")
    parser.add_argument("--recheck", action="store_true",
                        help="run each survivor's tests again in a fresh interpreter with the mutant written into "
                             "the source (catches mutants of import-time code, which mutmut's runner never "
                             "switches on); slow: one test run per survivor")
    parser.add_argument("--out", type=Path, help="results JSON (default experiments/results/mutation_<date>_<commit>.json)")
    args = parser.parse_args(argv)
    unknown = [m for m in args.modules if m not in MODULES]
    if unknown:
        parser.error(f"not configured: {', '.join(unknown)}; known: {', '.join(MODULES)}")
    commit = _git("rev-parse", "--short", "HEAD")
    date = dt.date.today().isoformat()
    out = args.out or ROOT / "experiments" / "results" / f"mutation_{date}_{commit}.json"
    results = json.loads(out.read_text()) if out.exists() else {"modules": {}}
    niceness = os.nice(0)  # the command as it was run: its priority and its options
    command = (f"nice -n {niceness} " if niceness else "") + ".venv/bin/python scripts/mutation.py " + " ".join(
        [*args.modules, *(["--max-children", str(args.max_children)] if args.max_children != 2 else []),
         *(["--recheck"] if args.recheck else [])])
    same_day = str(results.get("date") or "").startswith(date)
    earlier = results.get("command") if same_day else None  # one file, several calls
    results |= {"date": _now(), "commit": commit, "mutmut": _mutmut_version(), "machine": _machine(),
                "command": f"{earlier} && {command}" if earlier else command}
    for module in args.modules or list(MODULES):
        print(f"{module}: mutating against {', '.join(MODULES[module])}", flush=True)
        result = run_module(module, args.max_children, recheck_survivors=args.recheck)
        results["modules"][module] = result
        results["machine"] = _machine()  # its load average at the end of the latest module
        results["date"] = _now()  # the page orders a day's files by this time (a commit hash says nothing of order)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2) + "\n")  # after each module: a long run keeps what it did
        print(f"  {result['killed']}/{result['killed'] + len(result['survived'])} killed "
              f"({result['score']}; {len(result.get('killed_on_recheck', []))} of them on the fresh-process "
              f"recheck), {len(result['not_run'])} not run, {result['seconds']} s", flush=True)
    print(f"wrote {out}")
    return 0


def _machine() -> dict:
    """The benchmark harness's machine record (CPU, cores, memory, load), which the benchmark page quotes."""
    sys.path.insert(0, str(ROOT / "experiments"))
    import harness

    return harness.machine()


def _mutmut_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("mutmut")
    except PackageNotFoundError:
        return None


if __name__ == "__main__":
    sys.exit(main())
