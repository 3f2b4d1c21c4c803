"""Hypothesis strategies for raw DICOM Upper Layer input: PDUs, PDVs, command sets and damaged datasets.

Shared by ``tests/integration/test_listener_fuzz.py`` (a bounded, derandomized run)
and ``tests/soak_listener.py`` (thousands of cases from a seed). Values are
bytes ready to send with :class:`support.pdu.RawClient`.
"""

from __future__ import annotations

import struct

from hypothesis import strategies as st

from support.pdu import associate_rq, c_echo_rq, c_store_rq, p_data, pdu, pdv, release_rq

#: UIDs, good and bad: too long (> 64 characters), empty, with a NUL inside.
UIDS = st.sampled_from(["1.2.840.10008.1.1", "1.2.840.10008.5.1.4.1.1.2", "1.2", "", "1." * 40, "x\0y"])
ELEMENT_VALUES = st.one_of(st.binary(max_size=12), st.integers(0, 0xFFFF).map(lambda v: struct.pack("<H", v)),
                           UIDS.map(lambda s: s.encode("latin-1")))
#: Command sets: well-formed C-ECHO / C-STORE requests with odd values, loose elements, garbage.
COMMAND_SETS = st.one_of(
    st.builds(c_echo_rq, st.integers(0, 0xFFFF)),
    st.builds(c_store_rq, UIDS, st.integers(0, 0xFFFF), UIDS),
    st.dictionaries(st.sampled_from([0x0002, 0x0100, 0x0110, 0x0700, 0x0800, 0x0900, 0x1000, 0x0003]),
                    ELEMENT_VALUES, max_size=7).map(
        lambda d: b"".join(struct.pack("<HHI", 0, e, len(v)) + v for e, v in sorted(d.items()))),
    st.binary(max_size=64),
)
PDVS = st.one_of(
    st.builds(pdv, st.sampled_from([1, 3, 5, 7, 0, 255]), st.integers(0, 3),
              st.one_of(COMMAND_SETS, st.binary(max_size=200))),
    st.binary(max_size=12),  # a PDV item header cut short or nonsense
)
#: Any PDU type with a body, its announced length right, a little off, or far too large.
RAW_PDUS = st.builds(lambda t, body, delta: pdu(t, body, max(0, len(body) + delta)),
                     st.integers(0, 255), st.binary(max_size=120), st.sampled_from([0, 0, 0, -3, 1, 64, 1 << 30]))
#: A-ASSOCIATE-RQs with bad called AE titles, odd contexts, maximum lengths, application contexts.
RQ_PDUS = st.builds(associate_rq, st.sampled_from(["AINODE", "", "ainode", "AINODE\x00X"]),
                    st.sampled_from(["FUZZER", "", "MODALITY"]),
                    st.lists(st.tuples(st.integers(0, 255), UIDS, st.lists(UIDS, max_size=3)), max_size=3),
                    st.sampled_from([None, 0, 1, 6, 16384, 0xFFFFFFFF]), st.sampled_from(
                        ["1.2.840.10008.3.1.1.1", "1.2.3", ""]))
#: What follows an accepted association: P-DATA-TF with fuzzed PDVs, raw PDUs, A-RELEASE-RQ.
IN_ASSOCIATION = st.lists(st.one_of(st.lists(PDVS, min_size=1, max_size=3).map(lambda ps: p_data(*ps)), RAW_PDUS,
                                    st.just(release_rq())), min_size=1, max_size=4)


#: Edits to a clean dataset: cut it short at, overwrite at, or insert at a position (taken modulo its length).
DATASET_EDITS = st.lists(st.tuples(st.sampled_from(["cut", "flip", "insert"]), st.integers(0, 1 << 16),
                                   st.binary(min_size=1, max_size=8)), min_size=1, max_size=3)


def edited(data: bytes, edits: list[tuple[str, int, bytes]]) -> bytes:
    """``data`` with :data:`DATASET_EDITS` applied in order."""
    out = bytearray(data)
    for kind, at, raw in edits:
        at %= max(len(out), 1)
        if kind == "cut":
            del out[at:]
        elif kind == "flip":
            out[at:at + len(raw)] = raw
        else:
            out[at:at] = raw
    return bytes(out)

