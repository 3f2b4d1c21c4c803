"""Property-based fuzzing of STOW-RS request bodies (Hypothesis) against the node's HTTP app on loopback.

Malformed ``multipart/related`` bodies (``support/stow_fuzz.py``: bad or
missing boundaries, missing or extra CRLF, truncated parts and bodies, huge
part headers, wrong content types, garbage and truncated DICOM) must each get
a 4xx with a reason or a Store Instances response whose failed instances carry
a Failure Reason: never 500, never a temporary file left in the spool, and the
node answers the next request. ``derandomize=True``: CI runs the same bounded
set of examples every time; ``tests/soak_stow.py`` runs more.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from support.stow_fuzz import CT_SMALL, StowFuzzNode, answer_problem, good_body, multipart_requests


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StowFuzzNode]:
    started = StowFuzzNode(tmp_path_factory.mktemp("stow-fuzz"))
    yield started
    started.stop()


@settings(max_examples=150, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.data_too_large])
@given(request=multipart_requests(), study_in_url=st.booleans())
def test_malformed_multipart_bodies_get_a_reason_never_500(node: StowFuzzNode, request: tuple[str, bytes],
                                                           study_in_url: bool) -> None:
    content_type, body = request
    path = "/studies/1.2.3" if study_in_url else "/dicom-web/studies"
    status, headers, raw = node.post(path, body, content_type)
    assert answer_problem(status, headers, raw) is None, (status, raw[:500])
    # The response goes out after every part is handled: nothing is left being received.
    assert node.temp_files() == []


def test_node_still_answers_after_fuzzing(node: StowFuzzNode) -> None:
    status, _, raw = node.post("/studies", good_body(CT_SMALL))
    assert status == 200, raw
    assert node.temp_files() == []
