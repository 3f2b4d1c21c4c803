"""Deterministic UIDs for the result objects the node writes.

A re-run on the same source series with the same model must produce the same
Series and SOP Instance UIDs, so that a resend is idempotent at the PACS (it
replaces the earlier instance instead of adding a duplicate). UIDs are of the
``2.25.<integer>`` form (PS3.5 B.2), which needs no registered root: the
integer is a name-based (SHA-1, version 5) UUID of the inputs (ISO/IEC 9834-8
/ RFC 4122 4.3), so it is both standard and reproducible.

Not ``pydicom.uid.generate_uid(prefix=None, entropy_srcs=...)``: with
``prefix=None`` pydicom 3.0 ignores ``entropy_srcs`` and returns a random
UUID4, i.e. a different UID on every call.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

#: Namespace of our name-based UUIDs, so that they cannot collide with UUIDs
#: other software derives from the same source UIDs.
_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "urn:pacs-ai-screening-node:result-uid:v1")


def derive_uid(*parts: str) -> str:
    """A ``2.25.`` UID that is a pure function of ``parts`` (order matters).

    Each part is length-prefixed before hashing, so ``("ab", "c")`` and
    ``("a", "bc")`` give different UIDs.
    """
    if not parts:
        raise ValueError("derive_uid needs at least one part")
    for i, part in enumerate(parts):
        if not isinstance(part, str) or not part:
            raise ValueError(f"derive_uid part {i} must be a non-empty string, got {part!r}")
    name = "".join(f"{len(part)}:{part};" for part in parts)
    uid = f"2.25.{uuid.uuid5(_NAMESPACE, name).int}"
    # A 128-bit integer has at most 39 digits: at most 44 characters, valid (PS3.5 9.1).
    return uid


@dataclass(frozen=True)
class ResultUids:
    """Series and SOP Instance UIDs of the SEG and the SR made for one run."""

    seg_series_instance_uid: str
    seg_sop_instance_uid: str
    sr_series_instance_uid: str
    sr_sop_instance_uid: str


def result_uids(source_series_uid: str, model_key: str, version: int = 1, variant: str = "") -> ResultUids:
    """UIDs for the results of ``model_key`` (e.g. ``"body-lungs@1.0.0+3fa2c1"``)
    applied to the series ``source_series_uid``; ``version`` counts the results
    made for that series (late instances make version 2, 3, ...).

    Same inputs give the same UIDs; a different model key (new model bytes) or
    version gives new ones, so results of two model builds or two versions of
    the series never overwrite each other. ``variant`` (e.g. ``"LABELMAP"``)
    names a site option that changes the objects' SOP class: an instance UID
    must never name two objects of different classes.
    """
    for name, value in (("source_series_uid", source_series_uid), ("model_key", model_key)):
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"{name} must be a non-empty string, got {value!r}")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ValueError(f"version must be an integer >= 1, got {version!r}")
    # Version 1 keeps the derivation of the first release, so its UIDs are unchanged.
    parts = (source_series_uid, model_key) if version == 1 else (source_series_uid, model_key, f"v{version}")
    if not isinstance(variant, str):
        raise ValueError(f"variant must be a string, got {variant!r}")
    if variant:
        parts = (*parts, variant)
    return ResultUids(
        seg_series_instance_uid=derive_uid(*parts, "SEG", "series"),
        seg_sop_instance_uid=derive_uid(*parts, "SEG", "instance"),
        sr_series_instance_uid=derive_uid(*parts, "SR", "series"),
        sr_sop_instance_uid=derive_uid(*parts, "SR", "instance"),
    )
