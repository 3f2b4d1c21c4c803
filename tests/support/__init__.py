"""Builders and peers shared by the tests, one module per subject.

Test files import these modules (``from support.orthanc import Orthanc``);
``tests/`` is on ``sys.path`` because pytest puts the rootdir ``conftest.py``'s
folder there. No test file imports another test file or ``conftest``.

- :mod:`support.data`: where the test data lives (the real abdomen series).
- :mod:`support.processes`: free ports, bounded waits, stopping processes by PID.
- :mod:`support.dcmtk`: DCMTK's command-line tools (``storescu``) as a peer.
- :mod:`support.orthanc`: a private Orthanc (the PACS), also with the shipped routing rule.
- :mod:`support.node`: ``pacs-ai-node serve`` as a subprocess; waiting for its log lines.
- :mod:`support.pki`: a test CA and certificates made with openssl.
- :mod:`support.cli`: ``pacs-ai-node`` run in-process, config files.
- :mod:`support.findings`: SegmentFinding and AlgorithmIdentity builders; the key-image scene.
- :mod:`support.models`: model bundles and phantoms for the inference tests.
- :mod:`support.series`: new series (new UIDs) written from the real slices.
- :mod:`support.validators`: dciodvfy, dcmqi, tid1500reader wrappers.
- :mod:`support.crashkit`, :mod:`support.outage`: the crash and PACS-outage scenarios
  (shared by the system tests and the ``soak_*.py`` scripts).
- :mod:`support.ohif_viewer`: the OHIF viewer served next to Orthanc.
- :mod:`support.pdu`: raw Upper Layer PDUs built with ``struct`` and a raw client reading the node's answers;
  :mod:`support.pdu_strategies`: Hypothesis strategies for them; :mod:`support.listener_probe`: a node with
  short listener deadlines, its threads, RSS, ``.part`` files and stored UIDs (the listener fuzz test and
  ``soak_listener.py``).
"""
