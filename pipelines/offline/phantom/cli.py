"""``python -m pipelines.offline.phantom``: write synthetic CT phantom cases to a folder."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from pipelines.offline.phantom.case_folder import write_case
from pipelines.offline.phantom.grid import Grid
from pipelines.offline.phantom.sampling import sample_phantom
from pipelines.offline.phantom.tables import PhantomError

# --------------------------------------------------------------------------- command line


def main(argv: Sequence[str] | None = None) -> int:
    """Write phantom cases; returns the exit status.

    ``python -m pipelines.offline.phantom OUT_DIR --cases N --seed S [--grid coarse|chest] [--spacing MM]
    [--no-dicom]``.
    """
    parser = argparse.ArgumentParser(
        prog="python -m pipelines.offline.phantom",
        description="Write synthetic CT phantom cases (case_0000, ...; case i uses seed S + i).")
    parser.add_argument("out_dir", type=Path, help="folder to write the case folders into")
    parser.add_argument("--cases", type=int, default=1, help="number of cases (default 1)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the first case (default 0)")
    parser.add_argument("--grid", choices=("coarse", "chest"), default="coarse",
                        help="coarse: isotropic, covering the body (training); chest: 512 x 512, 0.78 mm pixels")
    parser.add_argument("--spacing", type=float, default=None,
                        help="coarse: voxel size (default 3 mm); chest: slice spacing (default 1 mm)")
    parser.add_argument("--no-dicom", action="store_true", help="write image.npz instead of a DICOM series")
    args = parser.parse_args(argv)
    if args.cases < 1:
        parser.error(f"--cases must be at least 1, got {args.cases}")
    if args.seed < 0:
        parser.error(f"--seed must be non-negative, got {args.seed}")
    if args.spacing is not None and not 0.2 <= args.spacing <= 20:
        parser.error(f"--spacing must be 0.2-20 mm, got {args.spacing}")
    for i in range(args.cases):
        seed = args.seed + i
        started = time.perf_counter()
        try:
            phantom = sample_phantom(seed)
            if args.grid == "coarse":
                grid = Grid.coarse(args.spacing or 3.0, phantom)
            else:
                grid = Grid.chest_ct(slice_mm=args.spacing or 1.0, phantom=phantom)
            case_dir = write_case(phantom, grid, args.out_dir / f"case_{i:04d}", dicom=not args.no_dicom)
        except PhantomError as exc:
            print(f"case_{i:04d} (seed {seed}): {exc}", file=sys.stderr)
            return 2
        findings = ", ".join(f"{les.site} {les.type} {les.diameter_mm:g} mm" for les in phantom.lesions) or "none"
        print(f"{case_dir.name}: seed {seed}, grid {'x'.join(map(str, grid.shape))}, liver {phantom.steatosis}, "
              f"bone {phantom.bone_density}, lesions: {findings} ({time.perf_counter() - started:.1f} s)")
    return 0
