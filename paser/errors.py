"""Errors that carry a message meant for the user: what is wrong and what is allowed."""


class PaserError(Exception):
    """Base class: run.py prints these without a traceback."""


class ConfigError(PaserError, ValueError):
    """A config value is invalid (the message names the key and the allowed values)."""


class DataError(PaserError, ValueError):
    """An input file is missing or malformed (the message names the file and line)."""


class TrainingError(PaserError, RuntimeError):
    """Recovery training cannot continue (e.g. a non-finite loss)."""
