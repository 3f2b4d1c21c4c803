"""Stage timings of one series' analysis, as typed records from the pipeline to the node's metrics and logs."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StageTiming:
    """How long one stage of a series' analysis took.

    ``stage`` is the stage's name (``"eligibility"``, ``"postprocess"``, ``"encode"``, ``"total"``, or a
    model stage's id such as ``"organs"``); ``bundle`` the model bundle it ran for ("" for series-wide
    stages); ``model`` is true for a network's own run (a stage of the bundle's cascade).
    """

    stage: str
    seconds: float
    bundle: str = ""
    model: bool = False

    def __post_init__(self) -> None:
        if not self.stage:
            raise ValueError("StageTiming.stage must not be empty")
        if not self.seconds >= 0.0:
            raise ValueError(f"StageTiming.seconds must be >= 0, got {self.seconds!r}")

    @property
    def label(self) -> str:
        """The stage as people read it in logs and on the status page: ``"model reference-cascade/organs"``,
        ``"encode reference-cascade"``, ``"eligibility"``."""
        if self.model:
            return f"model {self.bundle}/{self.stage}"
        return f"{self.stage} {self.bundle}" if self.bundle else self.stage
