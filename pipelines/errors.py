"""One exception hierarchy for the whole project.

Every error names the offending value, so that a log line or a CLI message is
enough to act on it.
"""


class PacsAiError(Exception):
    """Base class of every error this project raises on purpose."""


class SeriesRejected(PacsAiError):
    """A series that must not be analysed; ``reason`` is shown to the admin.

    Raised instead of repairing bad input (gaps, mixed orientation, ...).
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class ModelError(PacsAiError):
    """A model bundle that cannot be loaded or run (manifest, hash, shapes)."""


class ResultEncodingError(PacsAiError):
    """A result object (SEG, SR) could not be built from the findings."""
