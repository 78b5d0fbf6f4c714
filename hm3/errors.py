"""The project's error types.

Every failure a user can cause (bad paths, bad configs, incompatible models, bad
numbers) raises an :class:`Hm3Error` subclass whose message names the file,
tensor, key or value at fault. The CLI prints the message and exits non-zero;
anything else escaping is a bug.
"""

from __future__ import annotations


class Hm3Error(Exception):
    """Base class: a problem with the user's input, reported without a traceback."""

    exit_code = 2


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


class StoreError(Hm3Error):
    """A run store (``RUN_DIR/hm3.sqlite``) that is missing, corrupt, from another schema version, or misused."""


class StoreLockedError(StoreError):
    """Another process holds the run directory's write lock (one writer per run directory)."""


class SplitTooSmallError(Hm3Error):
    """A data split with too few examples for the subset asked of it."""


class BackendError(Hm3Error):
    """An evaluator backend that cannot be opened (not installed, model/tokenizer mismatch) or was misused."""


class FisherError(Hm3Error):
    """A diagonal Fisher that cannot be estimated (no examples, non-finite gradients) or a bad Fisher file."""


class RunFileError(Hm3Error):
    """A file of a run directory (posterior, policy, training checkpoint, summary, front table) that is
    corrupt, truncated, or in a format that could run code when read."""


class Hm3Warning(UserWarning):
    """Something a user should know about an output that is still written (e.g. no tokenizer to copy)."""
