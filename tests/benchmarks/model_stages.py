"""Time each stage of the model runtime on a 512x512x300 phantom CT series.

    .venv/bin/python tests/benchmarks/model_stages.py [--bundle reference-cascade] [--providers cpu|auto]
                                                    [--repeats 3] [--slices 300] [--rows 512]

Prints one table: decode (DICOM -> HU volume), resample (to each stage
spacing, once for all bundles), each model stage, post-processing (masks on
the source grid, lesion components, measurements) and encoding (SEG + SR), as
the median of ``--repeats`` warm runs, with the execution provider and the
machine (CPU count, GPU model when there is one). ``--providers auto`` uses
CUDA (and TensorRT) when onnxruntime offers it and an NVIDIA driver is
present; run it once with ``cpu`` and once with ``auto`` on a GPU machine to
compare in the same session.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from pipelines.analysis import SeriesAnalyzer  # noqa: E402
from pipelines.model.bundle import ModelBundle  # noqa: E402
from pipelines.model.inference import CascadeRunner, VolumeGrids  # noqa: E402
from pipelines.model.run import BundleRun  # noqa: E402
from pipelines.offline import phantom  # noqa: E402
from pipelines.timing import StageTiming  # noqa: E402
from pipelines.volume.ct import load_series  # noqa: E402


def gpu_name() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        return out.stdout.strip() or "none"
    except (OSError, subprocess.SubprocessError):
        return "none"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", default="reference-cascade")
    parser.add_argument("--providers", choices=("auto", "cpu"), default="auto")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--rows", type=int, default=512)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--work", type=Path, help="keep the phantom series here (reused when present)")
    args = parser.parse_args(argv)

    work = args.work or Path(tempfile.mkdtemp(prefix="model-stages-"))
    series_dir = work / f"phantom-{args.rows}x{args.rows}x{args.slices}-{args.seed}"
    started = time.perf_counter()
    if not (series_dir / "truth.json").exists():
        p = phantom.sample_phantom(args.seed, lesion_probability=0.5)
        grid = phantom.Grid.chest_ct(rows=args.rows, slices=args.slices, phantom=p)
        phantom.write_case(p, grid, series_dir)
    render_s = time.perf_counter() - started
    paths = sorted((series_dir / "dicom").glob("*.dcm"))

    providers = ["CPUExecutionProvider"] if args.providers == "cpu" else None
    bundle = ModelBundle(REPO / "onnx_models" / args.bundle, providers=providers)
    analyzer = SeriesAnalyzer(bundle)
    rows: dict[str, list[float]] = {}

    def add(name: str, seconds: float) -> None:
        rows.setdefault(name, []).append(seconds)

    for repeat in range(args.repeats + 1):  # the first run warms the sessions and is not counted
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        volume = load_series(paths)
        timings["decode (DICOM -> HU)"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        grids = VolumeGrids(volume)
        for spacing in sorted({s.target_spacing_mm for s in bundle.manifest.stages if s.task == "segmentation"}):
            grids.at(spacing)
        timings["resample (all stage spacings)"] = time.perf_counter() - t0
        run = BundleRun(bundle, grids, volume)
        stage_times: list[StageTiming] = []
        run.outputs = CascadeRunner(bundle).run(grids, components=run.typing_centres, timings=stage_times)
        for stage in stage_times:
            out = run.outputs[stage.stage]
            timings[f"{stage.label} ({out.patches} patches)"] = stage.seconds
        t0 = time.perf_counter()
        findings, sites, measurements = analyzer.findings_of(run)
        timings["postprocess + measurements"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        analyzer.encode(volume, findings, bundle=bundle)
        timings["encode SEG + SR"] = time.perf_counter() - t0
        timings["total"] = sum(timings.values())
        if repeat:
            for name, seconds in timings.items():
                add(name, seconds)

    print(f"phantom {args.rows}x{args.rows}x{args.slices} (rendered and written in {render_s:.1f} s), "
          f"{len(findings)} findings: " + "; ".join(s.line() for s in sites))
    print(f"bundle {bundle.key}; providers {sorted(set(bundle.providers.values()))}")
    print(f"machine: {os.cpu_count()} CPUs; GPU: {gpu_name()}")
    print(f"{'stage':<52} {'median s':>9} {'min s':>8}")
    for name, values in rows.items():
        print(f"{name:<52} {statistics.median(values):>9.3f} {min(values):>8.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
