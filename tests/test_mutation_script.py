"""scripts/mutation.py's staging rewrite: registered merge methods mutated as the plain calls their decorator means."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _import(name: str, path: Path):
    """The module at ``path`` imported as ``name`` (registered in sys.modules first: dataclasses look their
    module up there); the caller removes it."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def mutation_script():
    pytest.importorskip("libcst")  # mutmut's dependency (the mutation extra)
    yield _import("hm3_mutation_script", ROOT / "scripts" / "mutation.py")
    del sys.modules["hm3_mutation_script"]


def _staged(mutation_script, module: Path, name: str, tmp_path: Path, monkeypatch):
    """``module`` as scripts/mutation.py stages it, imported as ``name`` for this test."""
    path = tmp_path / module.name
    path.write_text(mutation_script.undecorate(module.read_text()))
    monkeypatch.setitem(sys.modules, name, None)  # so that the module is removed again when the test ends
    return _import(name, path)


SOURCE = '''import functools


@merge_method("a", needs_base=True)
def _a(x):
    """A."""
    return x


@functools.cache
def _cached(x):
    return x


@merge_method("b")
@merge_method("c")
def _b(x):
    return 2 * x


class Holder:
    @property
    def value(self):
        return 1

    @value.setter
    def value(self, v):
        pass

    @model_validator(mode="before")
    @classmethod
    def _before(cls, data):
        return data

    @staticmethod
    def plain():
        return 0
'''


def test_decorated_functions_become_assignments_where_mutmut_would_skip_them(mutation_script):
    out = mutation_script.undecorate(SOURCE)
    assert '@merge_method("a"' not in out and '_a = merge_method("a", needs_base=True)(_a)' in out
    assert out.index("def _a(x):") < out.index("_a = merge_method(")  # defined, then registered, in place
    assert '_b = merge_method("b")(merge_method("c")(_b))' in out  # nested as stacked decorators apply
    assert "_cached = functools.cache(_cached)" not in out and "@functools.cache\ndef _cached" in out  # not a name
    assert "    value = property(value)" in out and "    @value.setter" in out  # a setter would rebind value
    assert '    @classmethod\n    def _before' in out and '    _before = model_validator(mode="before")(_before)' in out
    assert "    @staticmethod\n    def plain" in out  # mutmut's own business


def test_the_rewritten_methods_module_registers_the_same_methods(mutation_script, tmp_path, monkeypatch):
    """The staged methods.py, imported as hm3.merge.methods would be, registers every method with the same
    specification, in the same order, and functions that compute the same docstring and result."""
    import torch

    from hm3.merge import methods

    staged = _staged(mutation_script, ROOT / "hm3" / "merge" / "methods.py", "hm3.merge.staged_methods", tmp_path,
                     monkeypatch)
    assert "@merge_method" not in (tmp_path / "methods.py").read_text()
    assert list(staged.MERGE_METHODS) == list(methods.MERGE_METHODS)
    def spec_of(method) -> tuple:  # functions compared by name: each module made its own
        params = [(p.name, p.default, p.required, p.hm3_only, p.value_type, p.search_bounds, p.check.__name__)
                  for p in (*method.params, *method.model_params)]
        return method.doc, method.fn.__name__, params, method.needs_base, method.mergekit_name, method.in_memory

    for name, method in methods.MERGE_METHODS.items():
        assert spec_of(staged.MERGE_METHODS[name]) == spec_of(method), name
    base, model = torch.zeros(3), torch.tensor([0.5, -0.25, 1.0])
    x = methods.TensorInputs(name="t", base=base, tensors=[model], model_params=[{"weight": 0.5, "density": 1.0}],
                             params={"lambda": 1.0, "normalize": False, "rescale": False, "int8_mask": False,
                                     "rescale_mode": None})
    assert torch.equal(staged.MERGE_METHODS["task_arithmetic"].fn(x), methods.MERGE_METHODS["task_arithmetic"].fn(x))


def test_the_rewritten_search_space_validates_and_dumps_as_the_original(mutation_script, tmp_path, monkeypatch):
    """space.py's pydantic validators and serializer, registered by assignment, run as the decorated ones do."""
    import pydantic

    from hm3.search import space

    staged = _staged(mutation_script, ROOT / "hm3" / "search" / "space.py", "hm3.search.staged_space", tmp_path,
                     monkeypatch)
    source = (tmp_path / "space.py").read_text()
    assert "@model_validator" not in source and "@property" not in source
    good = {"base_model": "base", "models": ["m1", "m2"], "dare": True}
    ours, theirs = staged.SearchSpace(**good), space.SearchSpace(**good)
    assert ours.model_dump() == theirs.model_dump() and ours.dim == theirs.dim
    assert ours.method_names == theirs.method_names
    for bad in ({**good, "models": ["m1", "m1"]}, {**good, "models": ["base", "m1"]},
                {"models": ["m1"], "methods": ["ties"]}):
        with pytest.raises(pydantic.ValidationError) as expected:
            space.SearchSpace(**bad)
        with pytest.raises(pydantic.ValidationError) as got:
            staged.SearchSpace(**bad)
        assert [e["msg"] for e in got.value.errors()] == [e["msg"] for e in expected.value.errors()]
