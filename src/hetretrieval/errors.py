"""Errors that the command line turns into one clear line instead of a traceback."""


class HetRetrievalError(Exception):
    """Base class: a problem the user can fix (bad config, missing data, missing weights)."""


class ConfigError(HetRetrievalError, ValueError):
    """A configuration value is invalid."""


class DataError(HetRetrievalError):
    """A dataset root, manifest or annotation file is missing or malformed."""


class WeightsUnavailableError(HetRetrievalError):
    """Pretrained weights cannot be obtained (no network and no local checkpoint)."""
