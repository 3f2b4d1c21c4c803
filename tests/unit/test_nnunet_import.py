"""nnU-Net v2 trained model folder -> ONNX bundle (pipelines.offline.nnunet_import).

Each test builds a real, small nnU-Net v2 results folder: plans.json and
dataset.json as nnU-Net writes them, and a checkpoint in nnU-Net's format
(a torch pickle with numpy scalars in its log) holding random weights of a
PlainConvUNet built independently of the importer. The ONNX output is compared
with that network, not with the importer's own rebuild of it.
"""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("dynamic_network_architectures")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
jsonschema = pytest.importorskip("jsonschema")

from dynamic_network_architectures.architectures.unet import PlainConvUNet  # noqa: E402

from pipelines.errors import ModelError  # noqa: E402
from pipelines.model.manifest import SCHEMA_PATH  # noqa: E402
from pipelines.offline import nnunet_import  # noqa: E402
from pipelines.offline.nnunet_import import import_nnunet, importer  # noqa: E402

SCHEMA = json.loads(SCHEMA_PATH.read_text())
DATASET = "Dataset123_AbdomenTest"
MODEL_DIR = "nnUNetTrainer__nnUNetPlans__3d_fullres"
SPACING = [2.5, 0.78125, 0.78125]
PATCH = [32, 40, 48]
FG = {"max": 3071.0, "mean": 99.53, "median": 104.0, "min": -1024.0,
      "percentile_00_5": -958.0, "percentile_99_5": 276.0, "std": 137.61}
ARCH_KWARGS = {
    "n_stages": 3,
    "features_per_stage": [4, 8, 16],
    "conv_op": "torch.nn.modules.conv.Conv3d",
    "kernel_sizes": [[1, 3, 3], [3, 3, 3], [3, 3, 3]],
    "strides": [[1, 1, 1], [1, 2, 2], [2, 2, 2]],
    "n_conv_per_stage": [2, 2, 2],
    "n_conv_per_stage_decoder": [2, 2],
    "conv_bias": True,
    "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
    "norm_op_kwargs": {"eps": 1e-05, "affine": True},
    "dropout_op": None,
    "dropout_op_kwargs": None,
    "nonlin": "torch.nn.LeakyReLU",
    "nonlin_kwargs": {"inplace": True},
}
LABELS = {"background": 0, "liver": 1, "pancreas": 2}


def make_plans(spacing: list[float] = SPACING, patch: list[int] = PATCH,
               transpose_forward: tuple[int, ...] = (0, 1, 2)) -> dict[str, Any]:
    """plans.json as nnU-Net v2 (>= 2.4) writes it, with a tiny 3d_fullres network."""
    resampling = {
        "resampling_fn_data": "resample_data_or_seg_to_shape",
        "resampling_fn_seg": "resample_data_or_seg_to_shape",
        "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None},
        "resampling_fn_seg_kwargs": {"is_seg": True, "order": 1, "order_z": 0, "force_separate_z": None},
        "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
        "resampling_fn_probabilities_kwargs": {"is_seg": False, "order": 1, "order_z": 0,
                                               "force_separate_z": None},
    }
    fullres = {
        "data_identifier": "nnUNetPlans_3d_fullres",
        "preprocessor_name": "DefaultPreprocessor",
        "batch_size": 2,
        "patch_size": list(patch),
        "median_image_size_in_voxels": [120.0, 400.0, 400.0],
        "spacing": list(spacing),
        "normalization_schemes": ["CTNormalization"],
        "use_mask_for_norm": [False],
        **resampling,
        "architecture": {
            "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
            "arch_kwargs": copy.deepcopy(ARCH_KWARGS),
            "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
        },
        "batch_dice": False,
    }
    two_d = {
        "data_identifier": "nnUNetPlans_2d",
        "preprocessor_name": "DefaultPreprocessor",
        "batch_size": 12,
        "patch_size": [64, 64],
        "median_image_size_in_voxels": [400.0, 400.0],
        "spacing": [0.78125, 0.78125],
        "normalization_schemes": ["CTNormalization"],
        "use_mask_for_norm": [False],
        **resampling,
        "architecture": {
            "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
            "arch_kwargs": {**copy.deepcopy(ARCH_KWARGS), "conv_op": "torch.nn.modules.conv.Conv2d",
                            "norm_op": "torch.nn.modules.instancenorm.InstanceNorm2d",
                            "kernel_sizes": [[3, 3]] * 3, "strides": [[1, 1], [2, 2], [2, 2]]},
            "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
        },
        "batch_dice": True,
    }
    return {
        "dataset_name": DATASET,
        "plans_name": "nnUNetPlans",
        "original_median_spacing_after_transp": list(spacing),
        "original_median_shape_after_transp": [120, 400, 400],
        "image_reader_writer": "SimpleITKIO",
        "transpose_forward": list(transpose_forward),
        "transpose_backward": [transpose_forward.index(i) for i in range(3)],
        "configurations": {
            "2d": two_d,
            "3d_fullres": fullres,
            "3d_cascade_fullres": {"inherits_from": "3d_fullres", "previous_stage": "3d_lowres"},
        },
        "experiment_planner_used": "ExperimentPlanner",
        "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {"0": dict(FG)},
    }


def make_dataset(labels: dict[str, Any] = LABELS, **extra: Any) -> dict[str, Any]:
    return {"channel_names": {"0": "CT"}, "labels": dict(labels), "numTraining": 12,
            "file_ending": ".nii.gz", **extra}


def make_network(n_outputs: int, kernel_sizes: Any = None, strides: Any = None) -> Any:
    """The network nnU-Net trains (with deep supervision), random weights, norms not at identity."""
    torch.manual_seed(1234)
    net = PlainConvUNet(
        input_channels=1, n_stages=3, features_per_stage=[4, 8, 16], conv_op=torch.nn.Conv3d,
        kernel_sizes=kernel_sizes or ARCH_KWARGS["kernel_sizes"], strides=strides or ARCH_KWARGS["strides"],
        n_conv_per_stage=[2, 2, 2], num_classes=n_outputs, n_conv_per_stage_decoder=[2, 2], conv_bias=True,
        norm_op=torch.nn.InstanceNorm3d, norm_op_kwargs={"eps": 1e-05, "affine": True},
        dropout_op=None, dropout_op_kwargs=None, nonlin=torch.nn.LeakyReLU, nonlin_kwargs={"inplace": True},
        deep_supervision=True,
    )
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return net


def save_checkpoint(path: Path, net: Any, plans: dict, dataset: dict, *, mirror_axes: Any = (0, 1, 2),
                    trainer: str = "nnUNetTrainer", prefix: str = "") -> None:
    """A checkpoint the way nnUNetTrainer.save_checkpoint writes it (numpy scalars in the log)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({
        "network_weights": {prefix + k: v for k, v in net.state_dict().items()},
        "optimizer_state": None,
        "grad_scaler_state": None,
        "logging": {"mean_fg_dice": [np.float64(0.41)], "ema_fg_dice": [np.float64(0.41)],
                    "dice_per_class_or_region": [[np.float64(0.5), np.float64(0.32)]],
                    "train_losses": [-0.3], "val_losses": [-0.2], "lrs": [0.01],
                    "epoch_start_timestamps": [1.7e9], "epoch_end_timestamps": [1.7e9 + 60]},
        "_best_ema": np.float64(0.41),
        "current_epoch": 1000,
        "init_args": {"plans": plans, "configuration": "3d_fullres", "fold": 0, "dataset_json": dataset,
                      "device": torch.device("cpu")},
        "trainer_name": trainer,
        "inference_allowed_mirroring_axes": mirror_axes,
    }, path)


def build_folder(root: Path, *, plans: dict | None = None, dataset: dict | None = None,
                 net: Any = None, **ckpt: Any) -> Path:
    plans = plans or make_plans()
    dataset = dataset or make_dataset()
    folder = root / DATASET / MODEL_DIR
    folder.mkdir(parents=True)
    (folder / "plans.json").write_text(json.dumps(plans, indent=4))
    (folder / "dataset.json").write_text(json.dumps(dataset, indent=4))
    n_out = len([k for k in dataset["labels"] if k != "ignore"])
    save_checkpoint(folder / "fold_0" / "checkpoint_final.pth", net or make_network(n_out), plans, dataset, **ckpt)
    return folder


def reference_logits(net: Any, x: np.ndarray) -> np.ndarray:
    """The trained network at inference (deep supervision off), on the model's own axes."""
    net = copy.deepcopy(net).eval()
    net.decoder.deep_supervision = False
    with torch.no_grad():
        return net(torch.from_numpy(x)).numpy()


def edit_json(path: Path, change: Callable[[dict], None]) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    root = tmp_path_factory.mktemp("nnunet")
    net = make_network(3)
    return build_folder(root, net=net), net


@pytest.fixture(scope="module")
def imported(model: tuple[Path, Any], tmp_path_factory: pytest.TempPathFactory) -> Any:
    return import_nnunet(model[0], tmp_path_factory.mktemp("models"))


@pytest.fixture
def folder_copy(model: tuple[Path, Any], tmp_path: Path) -> Path:
    """A private copy of the model folder, for tests that break it."""
    target = tmp_path / "src" / DATASET / MODEL_DIR
    shutil.copytree(model[0], target)
    return target


# ------------------------------------------------------------------ bundle


def test_manifest_follows_schema_and_plans(imported: Any) -> None:
    manifest = json.loads(imported.manifest_path.read_text())
    jsonschema.Draft202012Validator(SCHEMA).validate(manifest)
    assert manifest["schema_version"] == 2
    assert manifest["id"] == imported.bundle_id == "nnunet-dataset123-abdomentest"
    assert imported.bundle_dir.name == manifest["id"]
    assert manifest["manufacturer"] == "nnU-Net v2 import"
    assert "not validated" in manifest["regulatory_status"].lower()
    assert manifest["licence"].startswith("unknown")
    (stage,) = manifest["stages"]
    assert stage["input"]["target_spacing_mm"] == SPACING
    assert stage["input"]["axis_order"] == "NCZYX" and stage["input"]["orientation"] == "LPS"
    assert stage["input"]["intensity"] == {
        "method": "clip_zscore", "clip_hu": [FG["percentile_00_5"], FG["percentile_99_5"]],
        "mean_hu": FG["mean"], "std_hu": FG["std"]}
    assert stage["sliding_window"] == {"patch_size": PATCH, "overlap": 0.5, "gaussian": True,
                                       "mirror_axes": [0, 1, 2], "batch_size": 2}
    assert stage["output"] == {"name": "logits", "activation": "softmax",
                               "channels": ["background", "liver", "pancreas"]}
    assert imported.labels == ("background", "liver", "pancreas")
    liver, pancreas = manifest["segments"]
    assert (liver["number"], liver["label"], liver["channels"]) == (1, "liver", ["liver"])
    assert liver["type"] == {"value": "10200004", "scheme": "SCT", "meaning": "Liver"}
    assert liver["finding_site"] == liver["type"]
    assert liver["category"] == {"value": "91723000", "scheme": "SCT", "meaning": "Anatomical Structure"}
    assert liver["postprocess"] == {"largest_component": True}
    assert (pancreas["number"], pancreas["type"]["value"]) == (2, "15776009")
    source = manifest["provenance"]["source"]
    assert (source["trainer_name"], source["fold"], source["configuration"]) == ("nnUNetTrainer", "0", "3d_fullres")
    assert source["plans_name"] == "nnUNetPlans" and source["current_epoch"] == 1000
    assert manifest["provenance"]["export"]["opset"] == 17
    assert manifest["provenance"]["check"]["max_abs_diff"] == imported.max_abs_diff
    assert (imported.bundle_dir / manifest["model_card"]).read_text().startswith("# ")


def test_artifact_hash_ir_and_check(imported: Any) -> None:
    manifest = json.loads(imported.manifest_path.read_text())
    (artifact,) = manifest["artifacts"]
    assert imported.onnx_path == imported.bundle_dir / artifact["file"]
    digest = hashlib.sha256(imported.onnx_path.read_bytes()).hexdigest()
    assert digest == artifact["sha256"] == imported.sha256
    model = onnx.load(str(imported.onnx_path))
    assert model.ir_version <= 10
    assert [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] == [17]
    onnx.checker.check_model(model)
    assert imported.check_input_shape == (1, 1, *PATCH)
    assert 0 <= imported.max_abs_diff <= 1e-3 * max(1.0, imported.logits_scale)
    assert imported.mean_abs_diff <= imported.max_abs_diff
    # Real nnU-Net checkpoints hold numpy scalars: weights_only=True refuses them and the user is told.
    assert any("weights_only=False" in w for w in imported.warnings)


def test_onnx_matches_trained_network_at_another_size(imported: Any, model: tuple[Path, Any]) -> None:
    x = np.random.default_rng(99).standard_normal((2, 1, 32, 48, 40), dtype=np.float32)
    session = ort.InferenceSession(str(imported.onnx_path), providers=["CPUExecutionProvider"])
    (out,) = session.run(["logits"], {"ct": x})
    expected = reference_logits(model[1], x)
    assert out.shape == expected.shape == (2, 3, 32, 48, 40)
    assert np.abs(out - expected).max() <= 1e-3 * max(1.0, np.abs(expected).max())


def test_manifest_passes_the_node_loader(imported: Any) -> None:
    manifest_module = pytest.importorskip("pipelines.model.manifest")
    parsed, _ = manifest_module.load_manifest(imported.manifest_path)
    assert [s.label for s in parsed.segments] == ["liver", "pancreas"]


def test_export_is_deterministic(model: tuple[Path, Any], imported: Any, tmp_path: Path) -> None:
    again = import_nnunet(model[0], tmp_path)
    assert again.sha256 == imported.sha256
    assert again.manifest_path.read_bytes() == imported.manifest_path.read_bytes()


def test_existing_bundle_needs_overwrite(model: tuple[Path, Any], tmp_path: Path) -> None:
    first = import_nnunet(model[0], tmp_path, bundle_id="liver-test", version="2.0.1", check=False)
    with pytest.raises(ModelError, match="already exists"):
        import_nnunet(model[0], tmp_path, bundle_id="liver-test", check=False)
    again = import_nnunet(model[0], tmp_path, bundle_id="liver-test", version="2.0.2", check=False,
                          overwrite=True)
    assert again.bundle_dir == first.bundle_dir
    assert json.loads(again.manifest_path.read_text())["version"] == "2.0.2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["liver-test"]


# ------------------------------------------------------------------ the check


def test_check_catches_a_wrong_export(model: tuple[Path, Any], tmp_path: Path,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    real_export = importer._export_onnx

    def perturbed_export(module: Any, example: Any, opset: int) -> bytes:
        other = copy.deepcopy(module)
        with torch.no_grad():
            next(other.parameters()).add_(0.05)
        return real_export(other, example, opset)

    monkeypatch.setattr(importer, "_export_onnx", perturbed_export)
    with pytest.raises(ModelError, match="does not reproduce PyTorch.*max abs diff"):
        import_nnunet(model[0], tmp_path / "models")
    assert not (tmp_path / "models").exists() or not any((tmp_path / "models").iterdir())


# ------------------------------------------------------------------ variants


def test_transposed_plans_and_flips(tmp_path: Path) -> None:
    # nnU-Net moved node axis X first: plans hold spacing and patch in (X, Z, Y) order.
    tf = [2, 0, 1]
    node_spacing, node_patch = [2.5, 0.8, 0.7], [32, 40, 48]
    plans = make_plans(spacing=[node_spacing[a] for a in tf], patch=[node_patch[a] for a in tf],
                       transpose_forward=tf)
    net = make_network(3)
    folder = build_folder(tmp_path, plans=plans, net=net, mirror_axes=(0,))
    report = import_nnunet(folder, tmp_path / "models", flip_axes=(1, 2))
    stage = json.loads(report.manifest_path.read_text())["stages"][0]
    assert stage["input"]["target_spacing_mm"] == node_spacing
    assert stage["sliding_window"]["patch_size"] == node_patch
    assert stage["sliding_window"]["mirror_axes"] == [2]  # nnU-Net's axis 0 is the node's X
    x = np.random.default_rng(5).standard_normal((1, 1, 32, 48, 40), dtype=np.float32)
    (out,) = ort.InferenceSession(str(report.onnx_path), providers=["CPUExecutionProvider"]).run(None, {"ct": x})
    seen = np.flip(x, (3, 4)).transpose(0, 1, 4, 2, 3).copy()
    expected = np.flip(reference_logits(net, seen).transpose(0, 1, 3, 4, 2), (3, 4))
    assert np.abs(out - expected).max() <= 1e-3 * max(1.0, np.abs(expected).max())


def test_plans_from_nnunet_before_2_4(folder_copy: Path, model: tuple[Path, Any], tmp_path: Path) -> None:
    def legacy(plans: dict) -> None:
        cfg = plans["configurations"]["3d_fullres"]
        del cfg["architecture"]
        cfg.update(UNet_class_name="PlainConvUNet", UNet_base_num_features=4, unet_max_num_features=16,
                   n_conv_per_stage_encoder=[2, 2, 2], n_conv_per_stage_decoder=[2, 2],
                   num_pool_per_axis=[1, 2, 2], conv_kernel_sizes=ARCH_KWARGS["kernel_sizes"],
                   pool_op_kernel_sizes=ARCH_KWARGS["strides"])

    edit_json(folder_copy / "plans.json", legacy)
    report = import_nnunet(folder_copy, tmp_path / "models")
    assert any("nnU-Net < 2.4" in w for w in report.warnings)
    x = np.random.default_rng(7).standard_normal((1, 1, *PATCH), dtype=np.float32)
    (out,) = ort.InferenceSession(str(report.onnx_path), providers=["CPUExecutionProvider"]).run(None, {"ct": x})
    assert np.abs(out - reference_logits(model[1], x)).max() <= 1e-3


def test_region_based_training_gives_sigmoid_channels(tmp_path: Path) -> None:
    dataset = make_dataset({"background": 0, "kidney": [1, 2], "kidney_cyst": 2}, regions_class_order=[1, 2])
    codes = {"kidney_cyst": {"type": {"value": "367643001", "scheme": "SCT", "meaning": "Cyst"},
                             "finding_site": {"value": "64033007", "scheme": "SCT", "meaning": "Kidney"},
                             "category": {"value": "49755003", "scheme": "SCT",
                                          "meaning": "Morphologically Abnormal Structure"}}}
    folder = build_folder(tmp_path, dataset=dataset, net=make_network(2), prefix="_orig_mod.")
    report = import_nnunet(folder, tmp_path / "models", codes=codes, check=False)
    manifest = json.loads(report.manifest_path.read_text())
    jsonschema.Draft202012Validator(SCHEMA).validate(manifest)
    assert manifest["stages"][0]["output"]["activation"] == "sigmoid" == report.activation
    assert manifest["stages"][0]["output"]["channels"] == ["kidney", "kidney_cyst"]
    kidney, cyst = manifest["segments"]
    assert kidney["type"]["value"] == "64033007" and cyst["type"]["meaning"] == "Cyst"
    assert cyst["finding_site"]["value"] == "64033007" and cyst["role"] == "other"
    assert report.max_abs_diff is None and any("check=False" in w for w in report.warnings)


def test_configuration_inheriting_from_3d_fullres(folder_copy: Path, tmp_path: Path) -> None:
    edit_json(folder_copy / "plans.json", lambda p: p["configurations"].update(
        {"3d_fullres_bigpatch": {"inherits_from": "3d_fullres", "patch_size": [48, 48, 48]}}))
    report = import_nnunet(folder_copy, tmp_path / "models", configuration="3d_fullres_bigpatch")
    stage = json.loads(report.manifest_path.read_text())["stages"][0]
    assert stage["sliding_window"]["patch_size"] == [48, 48, 48] and report.check_input_shape == (1, 1, 48, 48, 48)
    assert stage["input"]["target_spacing_mm"] == SPACING  # inherited
    assert any("trained as configuration '3d_fullres'" in w for w in report.warnings)


def test_builtin_codes_for_totalsegmentator_names(tmp_path: Path) -> None:
    names = ["liver", "kidney_left", "vertebrae_L1", "rib_left_3", "urinary_bladder", "lung_upper_lobe_left"]
    dataset = make_dataset({"background": 0, **{n: i for i, n in enumerate(names, start=1)}})
    folder = build_folder(tmp_path, dataset=dataset, net=make_network(len(names) + 1), mirror_axes=None)
    report = import_nnunet(folder, tmp_path / "models", check=False)
    manifest = json.loads(report.manifest_path.read_text())
    jsonschema.Draft202012Validator(SCHEMA).validate(manifest)
    segs = {s["label"]: s for s in manifest["segments"]}
    assert [s["number"] for s in manifest["segments"]] == list(range(1, 7))
    assert segs["kidney_left"]["type"] == {"value": "64033007", "scheme": "SCT", "meaning": "Kidney"}
    assert segs["vertebrae_L1"]["type"]["value"] == "66794005" and segs["vertebrae_L1"]["role"] == "vertebrae"
    assert segs["rib_left_3"]["type"]["value"] == "113197003" and segs["rib_left_3"]["role"] == "ribs"
    assert segs["urinary_bladder"]["type"]["value"] == "89837001"
    assert segs["lung_upper_lobe_left"]["type"]["value"] == "45653009"
    assert "postprocess" not in segs["lung_upper_lobe_left"]
    # Trained without mirroring (nnUNetTrainerNoMirroring stores None): no test-time mirroring, and a warning.
    assert manifest["stages"][0]["sliding_window"]["mirror_axes"] == []
    assert any("orientation" in w for w in report.warnings)


# ------------------------------------------------------------------ refusals


def _remove(path: Path) -> None:
    shutil.rmtree(path) if path.is_dir() else path.unlink()


@pytest.mark.parametrize(
    ("change", "kwargs", "message"),
    [
        (lambda f: _remove(f / "fold_0" / "checkpoint_final.pth"), {}, r"checkpoint_final\.pth: checkpoint not found"),
        (lambda f: _remove(f / "plans.json"), {}, r"plans\.json: not found"),
        (lambda f: _remove(f / "dataset.json"), {}, r"dataset\.json: not found"),
        (None, {"fold": "1"}, r"fold_1: fold folder not found"),
        (None, {"fold": "one"}, r"fold must be .* got 'one'"),
        (None, {"checkpoint": "checkpoint_best.pth"}, r"checkpoint_best\.pth: checkpoint not found"),
        (None, {"configuration": "3d_lowres"}, r"no configuration '3d_lowres'"),
        (None, {"configuration": "2d"}, r"2d.*2D"),
        (None, {"configuration": "3d_cascade_fullres"}, r"cascade"),
        (None, {"bundle_id": "Not An Id"}, r"bundle_id must be .* got 'Not An Id'"),
        (None, {"version": "1.0"}, r"semantic version.* got '1\.0'"),
        (None, {"opset": 9}, r"opset must be .* got 9"),
        (None, {"flip_axes": (3,)}, r"flip_axes"),
        (None, {"allow_pickle": False}, r"allow_pickle is off"),
        (lambda f: edit_json(f / "plans.json", lambda p: p["configurations"]["3d_fullres"].update(
            normalization_schemes=["ZScoreNormalization"])), {}, r"'ZScoreNormalization' is not supported.*Hounsfield"),
        (lambda f: edit_json(f / "plans.json", lambda p: p["foreground_intensity_properties_per_channel"].clear()),
         {}, r"foreground_intensity_properties_per_channel\.0: missing"),
        (lambda f: edit_json(f / "dataset.json", lambda d: d.update(channel_names={"0": "CT", "1": "PET"})),
         {}, r"2 input channels"),
        (lambda f: edit_json(f / "dataset.json", lambda d: d["labels"].update(tumour=3)),
         {}, r"no code for labels \['tumour'\].*pass codes"),
        (lambda f: edit_json(f / "dataset.json", lambda d: d["labels"].update(tumour=4)),
         {}, r"consecutive"),
        (lambda f: edit_json(f / "plans.json", lambda p: p["configurations"]["3d_fullres"]["architecture"].update(
            network_class_name="os.system")), {}, r"network_class_name: 'os\.system' is outside the packages"),
        (lambda f: edit_json(f / "plans.json", lambda p: p["configurations"]["3d_fullres"]["architecture"].update(
            network_class_name="nnunetv2.custom.MyUNet")), {}, r"outside the packages"),
        (lambda f: edit_json(f / "plans.json", lambda p: p["configurations"]["3d_fullres"]["architecture"][
            "arch_kwargs"].update(nonlin="builtins.eval")), {}, r"arch_kwargs\.nonlin: 'builtins\.eval' is outside"),
        (lambda f: edit_json(f / "plans.json", lambda p: p["configurations"]["3d_fullres"]["architecture"][
            "arch_kwargs"].update(nonlin="torch.nn.functional.relu")), {}, r"'torch\.nn\.functional\.relu' is not a"),
        (lambda f: edit_json(f / "plans.json", lambda p: p["configurations"]["3d_fullres"]["architecture"][
            "arch_kwargs"].update(features_per_stage=[4, 8, 32])), {}, r"network_weights do not fit"),
    ],
    ids=["no-checkpoint", "no-plans", "no-dataset", "no-fold", "bad-fold", "other-checkpoint", "no-config", "2d",
         "cascade", "bad-id", "bad-version", "bad-opset", "bad-flip", "no-pickle", "zscore", "no-fg-stats",
         "two-channels", "label-without-code", "label-gap", "os-system", "nnunetv2-class", "eval-nonlin",
         "function-nonlin", "weights-mismatch"],
)
def test_refusals_name_the_problem(folder_copy: Path, tmp_path: Path, change: Any, kwargs: dict,
                                   message: str) -> None:
    if change is not None:
        change(folder_copy)
    with pytest.raises(ModelError, match=message):
        import_nnunet(folder_copy, tmp_path / "models", **kwargs)
    assert not (tmp_path / "models").exists() or not any((tmp_path / "models").iterdir())


def test_codes_override_and_are_checked(folder_copy: Path, tmp_path: Path) -> None:
    edit_json(folder_copy / "dataset.json", lambda d: d["labels"].update(tumour=3))
    with pytest.raises(ModelError, match=r"codes: \['tumor'\] are not foreground labels"):
        import_nnunet(folder_copy, tmp_path, codes={"tumor": {"value": "1", "scheme": "SCT", "meaning": "x"}})
    with pytest.raises(ModelError, match=r"codes\.tumour: a code must be an object"):
        import_nnunet(folder_copy, tmp_path, codes={"tumour": {"value": "108369006"}})
    codes_file = tmp_path / "codes.json"
    codes_file.write_text(json.dumps({"tumour": {"value": "108369006", "scheme": "SCT", "meaning": "Neoplasm"}}))
    # The tiny network has 3 outputs, the labels now 4: the weights must be refused, after the codes passed.
    with pytest.raises(ModelError, match="network_weights do not fit"):
        import_nnunet(folder_copy, tmp_path, codes=nnunet_import.load_codes(codes_file))


def test_missing_training_extra_says_how_to_install(model: tuple[Path, Any], tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "dynamic_network_architectures", None)
    with pytest.raises(ModelError, match=r"pip install 'pacs-ai-node\[train\]'"):
        import_nnunet(model[0], tmp_path)


def test_cli_import_then_verify_and_run_in_the_node(model: tuple[Path, Any], tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """`pacs-ai-node models import-nnunet` writes a bundle the node verifies and runs on a real CT series."""
    from node.cli.main import main
    from pipelines.analysis import SeriesAnalyzer
    from pipelines.model.bundle import ModelBundle
    from pipelines.volume.ct import load_series
    from support.data import abdomen_files

    folder, _ = model
    models_dir = tmp_path / "models"
    models_dir.mkdir()
    config = tmp_path / "node.toml"
    config.write_text(f'[models]\nmodels_dir = "{models_dir}"\n')
    assert main(["models", "import-nnunet", str(folder), "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert "ONNX matches PyTorch" in out and "written to" in out
    (bundle_dir,) = [p.parent for p in models_dir.glob("*/manifest.json")]
    assert main(["models", "verify", bundle_dir.name, "--config", str(config)]) == 0
    assert "OK" in capsys.readouterr().out
    bundle = ModelBundle(bundle_dir, providers=["CPUExecutionProvider"])
    volume = load_series(abdomen_files()[40:52])  # 12 real slices keep the sliding window (with TTA) short
    masks = SeriesAnalyzer(bundle).masks(volume)
    # Random weights segment something arbitrary; what matters is that the stage ran on the real grid.
    assert set(masks) == {s.label for s in bundle.manifest.segments}
    assert all(m.shape == volume.shape for m in masks.values())
