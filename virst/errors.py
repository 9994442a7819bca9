"""Errors a user can act on. The CLI prints their message and exits 2; nothing else is caught."""


class VirstError(Exception):
    """Base class: a clear, user-facing problem (bad input, bad checkpoint, bad option)."""


class VideoError(VirstError):
    """The video is missing, empty, unreadable or has the wrong shape."""


class CheckpointError(VirstError):
    """A model folder or checkpoint is missing, incomplete or does not match the config."""


class ConfigError(VirstError):
    """An unknown preset or an inconsistent configuration."""


class InputError(VirstError):
    """Any other bad argument (empty expression, wrong tensor shape, bad precision name)."""


class TrainingError(VirstError):
    """Training cannot usefully go on (e.g. the mask decoder ignores its prompt)."""
