"""Exceptions with messages that name the file, line, key or image at fault."""


class DetectError(Exception):
    """Base class for the toolkit's user-facing errors (printed as one line by the tools)."""


class ConfigError(DetectError, ValueError):
    """A config file or override is wrong: unknown key, wrong type, unreadable file."""


class DatasetError(DetectError, ValueError):
    """An annotation, split file or image cannot be used."""


class ImageReadError(DatasetError):
    """An image file is missing, truncated or not an image."""


class ResultsFormatError(DetectError, ValueError):
    """A detections/results file is malformed."""


class CheckpointError(DetectError, ValueError):
    """A checkpoint is missing, unsafe or belongs to another model."""


class ExportError(DetectError, ValueError):
    """A model cannot be exported, or its exported file differs from the eager model."""
