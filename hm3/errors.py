"""The project's error types and the exit codes they map to.

Every failure a user can cause (bad paths, bad configs, incompatible models, bad
numbers) raises an :class:`Hm3Error` subclass whose message names the file,
tensor, key or value at fault. The CLI prints the message and exits with the
class's :class:`ExitCode`; anything else escaping is a bug.
"""

from __future__ import annotations

import re
from enum import IntEnum
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pydantic import ValidationError


class ExitCode(IntEnum):
    """What ``hm3``'s exit status means (``hm3 --help`` lists them)."""

    OK = 0
    BUG = 1  # an unexpected error, shown with its traceback: a bug in hm3
    USAGE = 2  # the command line itself (an unknown flag, a missing argument)
    BAD_INPUT = 3  # a config, model, data file, run directory or other path given that cannot be used
    EVALUATION_FAILED = 4  # a model could not be scored, or a zoo missed its quality bar (--require-bar)
    ENVIRONMENT = 5  # a part not installed, a device not present, a full disk, no permission on a path hm3 chose
    INTERRUPTED = 130  # Ctrl-C (128 + SIGINT, as shells report it)


class Hm3Error(Exception):
    """Base class: a problem with the user's input, reported without a traceback."""

    exit_code: ExitCode = ExitCode.BAD_INPUT


class ConfigError(Hm3Error):
    """A recipe or run config that is malformed, refers to unknown keys or holds values out of range."""


class CheckpointError(Hm3Error):
    """A model directory that is missing, unreadable, corrupt or holds invalid tensors."""


class IncompatibleModelsError(Hm3Error):
    """Models that cannot be merged together (architecture, shapes, tensor sets differ)."""


class OutputExistsError(Hm3Error):
    """The output path already exists and ``--overwrite`` was not given."""


class DataFileError(Hm3Error):
    """A task data file (JSONL) that is missing, unreadable, malformed, or lacks the split asked for."""


class SandboxUnavailableError(Hm3Error):
    """The code sandbox cannot be set up safely here (no unprivileged user can run Python, no ``unshare``)."""

    exit_code = ExitCode.ENVIRONMENT


class MissingExtraError(Hm3Error):
    """A command or objective needs an optional part of hm3 that is not installed (:mod:`hm3.extras`)."""

    exit_code = ExitCode.ENVIRONMENT


class DeviceError(Hm3Error):
    """A device (``--device cuda``) that this machine or this torch build cannot use."""

    exit_code = ExitCode.ENVIRONMENT


class StoreError(Hm3Error):
    """A run store (``RUN_DIR/hm3.sqlite``) that is missing, corrupt, from another schema version, or misused."""


class StoreLockedError(StoreError):
    """Another process holds the run directory's write lock (one writer per run directory)."""


class SplitTooSmallError(Hm3Error):
    """A data split with too few examples for the subset asked of it."""


class BackendError(Hm3Error):
    """An evaluator backend that cannot score a model: it cannot be opened (model/tokenizer mismatch, a
    head size its kernels lack), was misused, or the model's outputs are unusable (non-finite logits)."""

    exit_code = ExitCode.EVALUATION_FAILED


class ExecutorError(Hm3Error):
    """A parallel executor that cannot run: no Ray cluster at the address given, fewer free resources than
    its workers need, a worker that died."""

    exit_code = ExitCode.ENVIRONMENT


class FisherError(Hm3Error):
    """A diagonal Fisher that cannot be estimated (no examples, non-finite gradients) or a bad Fisher file."""


class RunFileError(Hm3Error):
    """A file of a run directory (posterior, policy, training checkpoint, summary, front table) that is
    corrupt, truncated, or in a format that could run code when read."""


class Hm3Warning(UserWarning):
    """Something a user should know about an output that is still written (e.g. no tokenizer to copy)."""


# pydantic's own steps in an error location (``union[...]``, ``function-after[...]``, ``list[...]``), not keys
_VALIDATOR_STEP = re.compile(r"^[a-z][a-z-]*\[.*\]$")
_SCALAR = (str, int, float, bool, type(None))


def invalid_config(err: ValidationError, source: str, what: str, *, prefix: str = "", limit: int = 8) -> ConfigError:
    """A pydantic validation error as one :class:`ConfigError`: ``SOURCE: invalid WHAT:`` and one line per
    distinct problem, ``key.path: what is wrong`` (pydantic reports one error per union branch)."""
    lines = []
    for e in err.errors():
        keys = [str(p) for p in e["loc"] if not _VALIDATOR_STEP.match(str(p))]
        loc = prefix + ".".join(keys) if keys else prefix.rstrip(".")  # no keys: the whole section is wrong
        if e["type"] == "extra_forbidden":
            problem = "unknown key"
        elif e["type"] == "missing":
            problem = "required key is missing"
        else:
            problem = e["msg"].removeprefix("Value error, ")
            if e["type"] != "value_error" and isinstance(e.get("input"), _SCALAR):
                problem += f" (got {e['input']!r})"
        lines.append(f"{loc}: {problem}" if loc else problem)
    distinct = list(dict.fromkeys(lines))
    more = [f"... and {len(distinct) - limit} more"] if len(distinct) > limit else []
    return ConfigError(f"{source}: invalid {what}:\n  " + "\n  ".join(distinct[:limit] + more))
