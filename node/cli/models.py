"""``pacs-ai-node models``: what is installed, is it intact, and does it work here.

    pacs-ai-node models list [--config F]          one line per bundle in models_dir
    pacs-ai-node models verify [NAME...]           hashes, sessions and a dry run of every stage
    pacs-ai-node models describe NAME [--json]     the whole contract of one bundle
    pacs-ai-node models import-nnunet FOLDER       an nnU-Net v2 trained model -> an ONNX bundle
    pacs-ai-node models validate BUNDLE CASES_DIR  Dice, sensitivity, specificity, AUC on labelled cases

NAME is a bundle folder name under ``models.models_dir`` (or a path to a
bundle folder). Exit status: 0 on success, 1 when a bundle fails its check,
2 for usage and configuration errors.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import TypeVar

import numpy as np

from node.config import load_config
from pipelines.clinical.findings import CodeSpec
from pipelines.errors import ModelError, PacsAiError
from pipelines.model.bundle import ModelBundle, discover_bundles
from pipelines.model.manifest import MANIFEST_NAME, load_manifest


def _bundle_dir(name: str, models_dir: Path) -> Path:
    path = Path(name)
    if (path / MANIFEST_NAME).is_file():
        return path
    candidate = models_dir / name
    if (candidate / MANIFEST_NAME).is_file():
        return candidate
    raise ModelError(f"no bundle {name!r}: neither {path} nor {candidate} holds a {MANIFEST_NAME}")


def cmd_list(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    root = Path(args.models_dir) if args.models_dir else config.models_dir
    folders = discover_bundles(root)
    enabled = {p.resolve() for p in config.model_dirs} if config.enabled_models else {p.resolve() for p in folders}
    print(f"{'bundle':<22} {'version':<9} {'enabled':<8} {'stages':<36} {'segments':>8}  status")
    failed = 0
    for folder in folders:
        try:
            bundle = ModelBundle(folder, verify_only=True)
            m = bundle.manifest
            stages = " -> ".join(s.id for s in m.stages)
            status = "sha256 ok"
            print(f"{m.id:<22} {m.version:<9} {'yes' if folder.resolve() in enabled else 'no':<8} "
                  f"{stages:<36} {len(m.segments):>8}  {status}")
        except PacsAiError as exc:
            failed += 1
            print(f"{folder.name:<22} {'?':<9} {'?':<8} {'':<36} {'':>8}  BROKEN: {exc}")
    print(f"{len(folders)} bundles in {root}, {failed} broken")
    return 1 if failed else 0


def _dry_run(bundle: ModelBundle) -> list[str]:
    """Run each artifact once on a small constant volume; returns one line per stage."""
    lines = []
    for stage in bundle.manifest.stages:
        session = bundle.sessions[stage.artifact]
        shape: tuple[int, ...]
        if stage.task == "classification":
            assert stage.patch_size is not None  # parse_manifest requires one for a classification stage
            shape = stage.patch_size
        elif stage.sliding_window is not None:
            shape = stage.sliding_window.patch_size
        else:
            shape = tuple(max(stage.size_divisor, 16) for _ in range(3))
        x = stage.intensity.apply(np.full((1, 1, *shape), 40.0, dtype=np.float32))
        start = time.perf_counter()
        out = session.run(x)
        ms = (time.perf_counter() - start) * 1000
        expected = len(stage.channels)
        got = out.shape[1] if out.ndim >= 2 else -1
        if got != expected or not np.all(np.isfinite(out)):
            raise ModelError(f"stage {stage.id}: output {out.shape} (finite: {bool(np.all(np.isfinite(out)))}), "
                             f"the manifest names {expected} channels")
        lines.append(f"  stage {stage.id:<12} {stage.task:<15} input {tuple(x.shape)} -> {tuple(out.shape)} "
                     f"in {ms:.0f} ms on {session.provider}")
    return lines


def cmd_verify(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    folders = [_bundle_dir(n, config.models_dir) for n in args.names] if args.names else config.model_dirs
    failed = 0
    for folder in folders:
        try:
            bundle = ModelBundle(folder, require_gpu=args.require_gpu or config.require_gpu)
            lines = _dry_run(bundle)
            print(f"{bundle.key}: OK ({len(bundle.manifest.artifacts)} artifacts, sha256 verified, "
                  f"providers {sorted(set(bundle.providers.values()))})")
            for line in lines:
                print(line)
        except PacsAiError as exc:
            failed += 1
            print(f"{folder}: FAILED: {exc}")
    return 1 if failed else 0


def _code(c: CodeSpec | None) -> str:
    return f"{c.meaning} ({c.scheme} {c.value})" if c is not None else "-"


def cmd_describe(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    folder = _bundle_dir(args.name, config.models_dir)
    m, raw = load_manifest(folder / MANIFEST_NAME)
    if args.json:
        print(json.dumps(raw, indent=2))
        return 0
    out = [
        f"{m.name}",
        f"  id {m.id}, version {m.version}, folder {folder}",
        f"  manufacturer: {m.manufacturer}; authors: {', '.join(m.authors)}; licence: {m.licence}",
        f"  intended use: {m.intended_use}",
        f"  regulatory status: {m.regulatory_status}",
    ]
    if m.model_card:
        out.append(f"  model card: {folder / m.model_card}")
    out.append("artifacts:")
    for a in m.artifacts:
        out.append(f"  {a.id}: {a.file} sha256 {a.sha256}")
    out.append("stages:")
    for s in m.stages:
        out.append(f"  {s.id} ({s.task}, artifact {s.artifact}): input {s.input_name!r} at "
                   f"{'x'.join(f'{v:g}' for v in s.target_spacing_mm)} mm, intensity {s.intensity.method} "
                   f"clip {s.intensity.clip_hu[0]:g}..{s.intensity.clip_hu[1]:g} HU")
        if s.sliding_window:
            w = s.sliding_window
            out.append(f"    sliding window {'x'.join(map(str, w.patch_size))}, overlap {w.overlap:g}, "
                       f"gaussian {w.gaussian}, mirror axes {list(w.mirror_axes)}, batch {w.batch_size}")
        if s.patch_size:
            out.append(f"    patch {'x'.join(map(str, s.patch_size))} per component")
        if s.region:
            out.append(f"    region: bounding box of {list(s.region.labels)} from {s.region.stage} "
                       f"+ {s.region.margin_mm:g} mm")
        if s.gate:
            out.append(f"    gate: {list(s.gate.labels)} from {s.gate.stage}")
        out.append(f"    output {s.output_name!r} ({s.activation}): {', '.join(s.channels)}")
    out.append("segments:")
    for seg in m.segments:
        out.append(f"  {seg.number:>2} {seg.label:<14} from {seg.stage}:{'+'.join(seg.channels)} >= {seg.threshold:g}; "
                   f"type {_code(seg.type)}")
    if m.lesions:
        out.append(f"lesions (stage {m.lesions.stage}, channel {m.lesions.channel}, typing {m.lesions.typing_stage}):")
        for site in m.lesions.sites:
            out.append(f"  {site.site:<12} in {site.organ_segment:<12} threshold {site.threshold:g}, "
                       f">= {site.min_diameter_mm:g} mm: {_code(site.finding)}")
        for name, code in m.lesions.types.items():
            out.append(f"  type {name}: {_code(code)}")
    if m.measurements:
        out.append("measurements: " + ", ".join(f"{k} ({', '.join(f'{a}={b}' for a, b in v.items())})"
                                                for k, v in m.measurements.items()))
    print("\n".join(out))
    return 0


def cmd_import_nnunet(args: argparse.Namespace) -> int:
    from pipelines.offline.nnunet_import import import_nnunet, load_codes

    config = load_config(args.config)
    report = import_nnunet(
        Path(args.folder),
        Path(args.out) if args.out else config.models_dir,
        fold=args.fold,
        checkpoint=args.checkpoint,
        configuration=args.configuration,
        bundle_id=args.id,
        version=args.version,
        codes=load_codes(Path(args.codes)) if args.codes else None,
        flip_axes=tuple(args.flip_axes or ()),
        check=not args.no_check,
        allow_pickle=not args.no_pickle,
        overwrite=args.overwrite,
    )
    print(f"bundle {report.bundle_id} written to {report.bundle_dir}")
    if report.max_abs_diff is not None:
        print(f"  ONNX matches PyTorch on a random {report.check_input_shape} volume: max |diff| "
              f"{report.max_abs_diff:.2e} (logits up to {report.logits_scale:.2f}), mean {report.mean_abs_diff:.2e}")
    for warning in report.warnings:
        print(f"  warning: {warning}")
    print(f"next: pacs-ai-node models validate {report.bundle_dir} YOUR_LABELLED_CASES")
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from pipelines.offline.validation import format_report, validate_bundle

    config = load_config(args.config)
    folder = _bundle_dir(args.bundle, config.models_dir)
    bundle = ModelBundle(folder, require_gpu=config.require_gpu)

    def progress(name: str) -> None:
        if not args.quiet:
            print(f"  {name} done", file=sys.stderr)

    report = validate_bundle(bundle, Path(args.cases), min_diameter_mm=args.min_diameter_mm, limit=args.limit,
                             progress=progress, workers=args.workers)
    print(format_report(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
        print(f"metrics written to {args.json}")
    return 0 if not report["failed_cases"] else 1


_Parser = TypeVar("_Parser", bound=argparse.ArgumentParser)


def add_parser(sub: argparse._SubParsersAction[_Parser]) -> None:
    models = sub.add_parser("models", help="installed model bundles: list, verify, describe, import, validate")
    models_sub = models.add_subparsers(dest="models_command", required=True)

    p = models_sub.add_parser("list", help="one line per bundle in models_dir")
    p.add_argument("--config", type=Path)
    p.add_argument("--models-dir", help="list this folder instead of the configured one")
    p.set_defaults(func=cmd_list)

    p = models_sub.add_parser("verify", help="check hashes, load sessions and dry-run every stage")
    p.add_argument("names", nargs="*", metavar="NAME", help="bundle folder names or paths (default: enabled ones)")
    p.add_argument("--config", type=Path)
    p.add_argument("--require-gpu", action="store_true", help="fail when a stage would run on the CPU")
    p.set_defaults(func=cmd_verify)

    p = models_sub.add_parser("describe", help="the manifest of one bundle, readable")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--config", type=Path)
    p.add_argument("--json", action="store_true", help="print the manifest as JSON")
    p.set_defaults(func=cmd_describe)

    p = models_sub.add_parser("import-nnunet", help="turn an nnU-Net v2 trained model folder into an ONNX bundle")
    p.add_argument("folder", metavar="TRAINED_MODEL_FOLDER",
                   help="e.g. nnUNet_results/Dataset123_X/nnUNetTrainer__nnUNetPlans__3d_fullres")
    p.add_argument("--out", help="folder the bundle folder is written into (default: models_dir)")
    p.add_argument("--fold", default="0", help="fold folder to read (0-4 or 'all'; default 0)")
    p.add_argument("--checkpoint", default="checkpoint_final.pth")
    p.add_argument("--configuration", help="nnU-Net configuration (default: from the folder name)")
    p.add_argument("--id", help="bundle id (default from the dataset name)")
    p.add_argument("--version", default="1.0.0", help="bundle semantic version")
    p.add_argument("--codes",
                   help="JSON file: label name -> {value, scheme, meaning} for labels without a built-in code")
    p.add_argument("--flip-axes", type=int, nargs="*", metavar="AXIS",
                   help="axes (0=Z 1=Y 2=X) to flip inside the graph, for models trained on RAS-ordered arrays")
    p.add_argument("--no-check", action="store_true", help="skip the ONNX vs PyTorch comparison")
    p.add_argument("--no-pickle", action="store_true",
                   help="refuse checkpoints that need a full pickle load (only tensors allowed)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing bundle of the same id")
    p.add_argument("--config", type=Path)
    p.set_defaults(func=cmd_import_nnunet)

    p = models_sub.add_parser("validate", help="Dice, sensitivity, specificity and AUC on labelled cases")
    p.add_argument("bundle", metavar="BUNDLE", help="bundle folder name or path")
    p.add_argument("cases", metavar="LABELLED_DIR", help="folder of CASE/{dicom/,labels.npz,truth.json}")
    p.add_argument("--min-diameter-mm", type=float, default=10.0, help="lesion size for the headline figures")
    p.add_argument("--limit", type=int, help="only the first N cases")
    p.add_argument("--workers", type=int, default=1, help="cases evaluated in this many processes")
    p.add_argument("--json", help="also write the metrics to this JSON file")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--config", type=Path)
    p.set_defaults(func=cmd_validate)
