"""The hospital loop with Orthanc routing: the modality sends to the PACS only.

DCMTK storescu (the modality) -> Orthanc (the PACS) -> the shipped Lua rule
``deploy/orthanc/route-ct-to-ainode.lua`` forwards the stable CT series ->
the node -> SEG + SR back into the same study in Orthanc. Orthanc runs with
the shipped ``deploy/orthanc/orthanc-example.json`` (its comments stripped),
with only ports, paths, credentials and a short StableAge replaced, so the
admin's example is what is tested.

Black-box: the node is ``python -m node serve``; what it did is read from
``series list``; what Orthanc did from its REST API, QIDO-RS and its log.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pydicom
import pytest

from support.data import REPO, abdomen_files
from support.dcmtk import storescu
from support.orthanc import (
    NODE_ALIAS,
    ROUTING_SCRIPT,
    Orthanc,
    RoutingOrthanc,
    example_config,
    running_orthanc,
)
from support.processes import wait_for
from support.series import copy_series

SC_CLASS = "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture Image Storage


@pytest.fixture
def routing_orthanc(tmp_path: Path):  # noqa: ANN201
    yield from running_orthanc(RoutingOrthanc, tmp_path, "HOSPITALPACS")


def series_list(data_dir: Path) -> dict[str, tuple[str, int]]:
    """``series list`` as {series uid: (state, instance count)}."""
    listing = subprocess.run([sys.executable, "-m", "node", "series", "list", "--data-dir", str(data_dir)],
                             capture_output=True, text=True, timeout=60, cwd=REPO)
    out = {}
    for line in listing.stdout.splitlines()[1:]:
        match = re.match(r"^(\S+)\s+(\S+)\s+(\d+)\s", line)
        if match:
            out[match[1]] = (match[2], int(match[3]))
    return out


def modality_series(orthanc: Orthanc, study_uid: str) -> dict[str, list[dict]]:
    """QIDO-RS series of a study, grouped by modality."""
    out: dict[str, list[dict]] = {}
    for item in orthanc.series_in_study(study_uid):
        out.setdefault(item.get("00080060", {}).get("Value", [""])[0], []).append(item)
    return out


def store_jobs(orthanc: Orthanc) -> list[dict]:
    """Orthanc's C-STORE jobs towards the node."""
    jobs = orthanc.get("/jobs?expand")
    return [j for j in jobs if j.get("Type") == "DicomModalityStore" and j["Content"].get("RemoteAet") == "AINODE"]


def test_example_config_names_the_shipped_script_and_alias() -> None:
    """The admin's example and the script agree on the alias and the script's name."""
    config = example_config()
    assert NODE_ALIAS in config["DicomModalities"]
    assert any(Path(p).name == ROUTING_SCRIPT.name for p in config["LuaScripts"])
    assert f"local NODE_MODALITY = '{NODE_ALIAS}'" in ROUTING_SCRIPT.read_text()


def test_pacs_routes_ct_to_node_and_gets_seg_and_sr_back(routing_orthanc: RoutingOrthanc, start_node,
                                                         tmp_path: Path) -> None:
    orthanc = routing_orthanc
    node = start_node("--send-to", f"{orthanc.aet}@127.0.0.1:{orthanc.dicom_port}", "--quiet-seconds", "2",
                      port=orthanc.node_port)
    files = abdomen_files()
    first = pydicom.dcmread(files[0], stop_before_pixels=True)
    study_uid, ct_series_uid = str(first.StudyInstanceUID), str(first.SeriesInstanceUID)
    # Series the rule must not forward: a scout, a CT that is not a CT Image
    # (Secondary Capture), a CT that the node itself sent.
    decoys = {
        "scout": (copy_series(tmp_path / "scout", 10, ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"],
                              SeriesNumber=97).files,
                  orthanc.modality_aet, "contains LOCALIZER"),
        "sc": (copy_series(tmp_path / "sc", 10, SOPClassUID=SC_CLASS, SeriesNumber=98).files,
               orthanc.modality_aet, f"SOP class {SC_CLASS} is not CT Image or Enhanced CT Image"),
        "from node": (copy_series(tmp_path / "from-node", 10, SeriesNumber=99).files, "AINODE",
                      "it came from the node itself (calling AE AINODE)"),
    }

    # The modality (and the node, for the last decoy) know only the PACS.
    for decoy, calling, _ in decoys.values():
        sent = storescu(orthanc.dicom_port, decoy, called=orthanc.aet, calling=calling)
        assert sent.returncode == 0, sent.stderr
    sent = storescu(orthanc.dicom_port, files, called=orthanc.aet, calling=orthanc.modality_aet)
    assert sent.returncode == 0, sent.stderr
    stored = time.monotonic()

    # Milestones, polled together: the routing job, the node done, SEG + SR in the PACS.
    milestones: dict[str, float] = {}

    def loop_closed() -> bool:
        now = time.monotonic()
        if "job" not in milestones and store_jobs(orthanc):
            milestones["job"] = now
        if "node done" not in milestones and series_list(node.data_dir).get(ct_series_uid, ("",))[0] == "done":
            milestones["node done"] = now
        if {"SEG", "SR"} <= set(modality_series(orthanc, study_uid)):
            milestones["results"] = now
            return True
        return False

    wait_for(loop_closed, 90, interval=0.25, what="SEG and SR in Orthanc after routing")
    latency = milestones["results"] - stored
    print(f"routing loop: storescu done -> store job {milestones.get('job', float('nan')) - stored:.1f} s "
          f"(StableAge 2 s) -> node done {milestones.get('node done', float('nan')) - stored:.1f} s "
          f"-> SEG + SR in Orthanc {latency:.1f} s")

    # No loop: once the SEG and SR series are stable too, the rule has looked at
    # them and sent nothing. Orthanc reports stability per series.
    def results_stable() -> bool:
        series = [orthanc.get(f"/series/{sid}") for sid in orthanc.get(f"/studies/{_study_id(orthanc, study_uid)}")
                  ["Series"]]
        return all(s.get("IsStable") for s in series) and len(series) == 2 + len(decoys) + 1
    wait_for(results_stable, 30, interval=0.5, what="every series of the study stable in Orthanc")
    wait_for(lambda: len(re.findall(r"not sent to ainode: modality (SEG|SR) is not routed", orthanc.log_text())) == 2,
             10, what="the rule's log lines for the SEG and SR series")
    log = orthanc.log_text()
    for name, (decoy, _, reason) in decoys.items():
        decoy_uid = str(pydicom.dcmread(decoy[0], stop_before_pixels=True).SeriesInstanceUID)
        lines = [line for line in log.splitlines() if f"series {decoy_uid} not sent to ainode: " in line]
        assert len(lines) == 1 and reason in lines[0], f"{name}: the rule did not skip it ({lines})"

    jobs = store_jobs(orthanc)
    assert len(jobs) == 1, f"expected one routing job, got {jobs}"
    assert jobs[0]["State"] == "Success" and jobs[0]["Content"]["InstancesCount"] == len(files)

    # The node got the CT exactly once, and nothing else (no decoy, no SEG/SR).
    listing = series_list(node.data_dir)
    assert listing == {ct_series_uid: ("done", len(files))}, listing

    # One SEG and one SR, each a single instance, in the CT's study.
    by_modality = modality_series(orthanc, study_uid)
    assert set(by_modality) == {"CT", "SEG", "SR"}
    assert len(by_modality["CT"]) == 1 + len(decoys)
    for modality in ("SEG", "SR"):
        (item,) = by_modality[modality]
        assert item["00201209"]["Value"][0] == 1, f"{modality}: {item['00201209']}"

    # What the rule logged names UIDs and AE titles, never the patient.
    lua_lines = "\n".join(line for line in log.splitlines() if "route-ct-to-ainode" in line)
    assert ct_series_uid in lua_lines
    assert str(first.PatientName) not in lua_lines and str(first.PatientID) not in lua_lines


def _study_id(orthanc: Orthanc, study_uid: str) -> str:
    found = json.loads(orthanc.request("POST", "/tools/lookup", study_uid.encode()))
    return next(item["ID"] for item in found if item["Type"] == "Study")


def test_failed_routing_job_is_logged_and_a_resubmit_delivers(routing_orthanc: RoutingOrthanc, start_node,
                                                               tmp_path: Path) -> None:
    """The node is down when the CT becomes stable: Orthanc does not retry the job by itself;
    the rule logs the command that resubmits it, and the resubmitted job closes the loop."""
    orthanc = routing_orthanc
    files = abdomen_files()
    first = pydicom.dcmread(files[0], stop_before_pixels=True)
    study_uid, ct_series_uid = str(first.StudyInstanceUID), str(first.SeriesInstanceUID)
    sent = storescu(orthanc.dicom_port, files, called=orthanc.aet, calling=orthanc.modality_aet)
    assert sent.returncode == 0, sent.stderr

    failed = wait_for(lambda: re.search(r"store job (\S+) to ainode FAILED: .*resubmit with: POST /jobs/(\S+)/resubmit",
                                        orthanc.log_text()), 30, what="the rule's line about the failed job")
    job_id = failed[1]
    assert failed[2] == job_id
    assert orthanc.get(f"/jobs/{job_id}")["State"] == "Failure"

    node = start_node("--send-to", f"{orthanc.aet}@127.0.0.1:{orthanc.dicom_port}", "--quiet-seconds", "2",
                      port=orthanc.node_port)
    orthanc.request("POST", f"/jobs/{job_id}/resubmit", b"")
    wait_for(lambda: {"SEG", "SR"} <= set(modality_series(orthanc, study_uid)), 60, interval=0.5,
             what="SEG and SR after the resubmitted job")
    assert series_list(node.data_dir) == {ct_series_uid: ("done", len(files))}
    assert "store job " + job_id + " to ainode done: 112 instances sent" in orthanc.log_text()
