"""Reading nnU-Net's plans.json: the configuration, axis order, CT intensity normalisation and the network
architecture."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pipelines.errors import ModelError

#: Packages whose classes plans.json may name; nothing else is ever imported from it.
NETWORK_PACKAGES = ("dynamic_network_architectures",)
LAYER_PACKAGES = ("torch.nn", "dynamic_network_architectures")
_DOTTED_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


# ------------------------------------------------------------ plans, dataset


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelError(f"{path}: not found (an nnU-Net v2 trained model folder holds plans.json, "
                         "dataset.json and fold_<f>/)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"{path}: cannot be read as JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise ModelError(f"{path}: must hold a JSON object, got {type(data).__name__}")
    return data


def _resolve_configuration(plans: dict[str, Any], name: str, path: Path) -> dict[str, Any]:
    """The configuration with ``inherits_from`` parents merged in (shallow, child wins), as nnU-Net does."""
    configs = plans.get("configurations")
    if not isinstance(configs, dict):
        raise ModelError(f"{path}: no 'configurations' object")
    chain: list[str] = []
    current = name
    while True:
        if current in chain:
            raise ModelError(f"{path}: configurations inherit in a circle: {' -> '.join([*chain, current])}")
        cfg = configs.get(current)
        if not isinstance(cfg, dict):
            which = "configuration" if current == name else f"parent configuration (inherits_from of {chain[-1]!r})"
            raise ModelError(f"{path}: no {which} {current!r} in configurations (has {sorted(configs)})")
        chain.append(current)
        parent = cfg.get("inherits_from")
        if parent is None:
            break
        current = parent
    merged: dict[str, Any] = {}
    for c in reversed(chain):
        merged.update(configs[c])
    return merged


def _check_transpose(plans: dict[str, Any], path: Path) -> list[int]:
    tf = plans.get("transpose_forward", [0, 1, 2])
    tb = plans.get("transpose_backward")
    if not isinstance(tf, list) or sorted(tf) != [0, 1, 2] or not all(isinstance(i, int) for i in tf):
        raise ModelError(f"{path}: transpose_forward must be a permutation of [0, 1, 2], got {tf!r}")
    if tb is not None and tb != [tf.index(i) for i in range(3)]:
        raise ModelError(f"{path}: transpose_backward {tb!r} is not the inverse of transpose_forward {tf!r}")
    return list(tf)


def _zyx(cfg: dict[str, Any], key: str, where: str, kind: type) -> list[Any]:
    value = cfg.get(key)
    if isinstance(value, list) and len(value) == 2:
        raise ModelError(f"{where}.{key}: {value!r} is 2D; 2D configurations predict slice by slice, the "
                         "node runs 3D patches: import a 3d_fullres or 3d_lowres model")
    if not isinstance(value, list) or len(value) != 3:
        raise ModelError(f"{where}.{key}: must be three numbers, got {value!r}")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in value):
        raise ModelError(f"{where}.{key}: must be positive numbers, got {value!r}")
    if kind is int and not all(float(v).is_integer() for v in value):
        raise ModelError(f"{where}.{key}: must be whole numbers, got {value!r}")
    return [kind(v) for v in value]


def _ct_intensity(plans: dict[str, Any], cfg: dict[str, Any], dataset: dict[str, Any], folder: Path) -> dict[str, Any]:
    channels = dataset.get("channel_names", dataset.get("modality"))
    if not isinstance(channels, dict) or not channels:
        raise ModelError(f"{folder / 'dataset.json'}: no 'channel_names' object (e.g. {{\"0\": \"CT\"}})")
    if len(channels) != 1:
        raise ModelError(
            f"{folder / 'dataset.json'}: channel_names {channels!r} has {len(channels)} input channels; the node "
            "feeds one CT volume, so only single-channel CT models can be imported"
        )
    schemes = cfg.get("normalization_schemes")
    where = f"{folder / 'plans.json'}: configurations normalization_schemes"
    if not isinstance(schemes, list) or len(schemes) != 1:
        raise ModelError(f"{where}: must list one scheme for the one input channel, got {schemes!r}")
    if schemes[0] != "CTNormalization":
        raise ModelError(
            f"{where}: {schemes[0]!r} is not supported: the node feeds Hounsfield units and reproduces only "
            "nnU-Net's CTNormalization (clip to the dataset's foreground percentiles, then z-score); a model "
            f"normalised per image ({schemes[0]}) would see different inputs than it was trained on"
        )
    props = plans.get("foreground_intensity_properties_per_channel", {})
    stats = props.get("0") if isinstance(props, dict) else None
    where = f"{folder / 'plans.json'}: foreground_intensity_properties_per_channel.0"
    if not isinstance(stats, dict):
        raise ModelError(f"{where}: missing; CTNormalization needs the foreground intensity statistics")
    values = {}
    for key in ("percentile_00_5", "percentile_99_5", "mean", "std"):
        v = stats.get(key)
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
            raise ModelError(f"{where}.{key}: must be a finite number, got {v!r}")
        values[key] = float(v)
    if not values["percentile_00_5"] < values["percentile_99_5"]:
        raise ModelError(f"{where}: percentile_00_5 {values['percentile_00_5']} must be below "
                         f"percentile_99_5 {values['percentile_99_5']}")
    if values["std"] <= 0:
        raise ModelError(f"{where}.std: must be positive, got {values['std']}")
    return {
        "method": "clip_zscore",
        "clip_hu": [values["percentile_00_5"], values["percentile_99_5"]],
        "mean_hu": values["mean"],
        "std_hu": values["std"],
    }


def _architecture(cfg: dict[str, Any], where: str, warn: list[str]) -> dict[str, Any]:
    """The nnU-Net >= 2.4 ``architecture`` entry; older plans (``UNet_class_name``) are converted."""
    arch = cfg.get("architecture")
    if arch is None and "UNet_class_name" in cfg:
        arch = _legacy_architecture(cfg, where)
        warn.append(f"{where}: plans from nnU-Net < 2.4 (UNet_class_name); architecture rebuilt from it")
    if not isinstance(arch, dict):
        raise ModelError(f"{where}.architecture: missing (expected network_class_name and arch_kwargs)")
    name = arch.get("network_class_name")
    kwargs = arch.get("arch_kwargs")
    imports = arch.get("_kw_requires_import", [])
    if not isinstance(name, str) or not name:
        raise ModelError(f"{where}.architecture.network_class_name: must be a class name, got {name!r}")
    if not isinstance(kwargs, dict):
        raise ModelError(f"{where}.architecture.arch_kwargs: must be an object, got {kwargs!r}")
    if not isinstance(imports, list) or not all(isinstance(k, str) for k in imports):
        raise ModelError(f"{where}.architecture._kw_requires_import: must be a list of keys, got {imports!r}")
    # Refuse names outside the allowed packages before anything is imported.
    _check_dotted(name, NETWORK_PACKAGES, f"{where}.architecture.network_class_name", short_ok=True)
    for key in imports:
        if key not in kwargs:
            raise ModelError(f"{where}.architecture._kw_requires_import: {key!r} is not in arch_kwargs")
        if kwargs[key] is not None:
            _check_dotted(kwargs[key], LAYER_PACKAGES, f"{where}.architecture.arch_kwargs.{key}")
    conv = kwargs.get("conv_op")
    if isinstance(conv, str) and conv.endswith("2d"):
        raise ModelError(f"{where}.architecture.arch_kwargs.conv_op: {conv!r} is 2D; the node runs 3D patches: "
                         "import a 3d_fullres or 3d_lowres model")
    return {"network_class_name": name, "arch_kwargs": kwargs, "_kw_requires_import": imports, "where": where}


def _legacy_architecture(cfg: dict[str, Any], where: str) -> dict[str, Any]:
    """nnU-Net < 2.4 plans -> the >= 2.4 ``architecture`` entry (the same network nnU-Net built then)."""
    try:
        cls = cfg["UNet_class_name"]
        kernels = cfg["conv_kernel_sizes"]
        strides = cfg["pool_op_kernel_sizes"]
        base = int(cfg["UNet_base_num_features"])
        top = int(cfg["unet_max_num_features"])
        enc = cfg["n_conv_per_stage_encoder"]
        dec = cfg["n_conv_per_stage_decoder"]
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelError(f"{where}: old-style plans lack or mistype {exc}") from None
    if cls not in ("PlainConvUNet", "ResidualEncoderUNet"):
        raise ModelError(f"{where}.UNet_class_name: {cls!r} is not PlainConvUNet or ResidualEncoderUNet")
    dim = len(kernels[0])
    n = len(kernels)
    kwargs = {
        "n_stages": n,
        "features_per_stage": [min(base * 2**i, top) for i in range(n)],
        "conv_op": f"torch.nn.modules.conv.Conv{dim}d",
        "kernel_sizes": kernels,
        "strides": strides,
        "n_conv_per_stage" if cls == "PlainConvUNet" else "n_blocks_per_stage": enc,
        "n_conv_per_stage_decoder": dec,
        "conv_bias": True,
        "norm_op": f"torch.nn.modules.instancenorm.InstanceNorm{dim}d",
        "norm_op_kwargs": {"eps": 1e-05, "affine": True},
        "dropout_op": None,
        "dropout_op_kwargs": None,
        "nonlin": "torch.nn.LeakyReLU",
        "nonlin_kwargs": {"inplace": True},
    }
    return {
        "network_class_name": f"dynamic_network_architectures.architectures.unet.{cls}",
        "arch_kwargs": kwargs,
        "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
    }


def _check_dotted(name: Any, packages: Sequence[str], where: str, *, short_ok: bool = False) -> None:
    if not isinstance(name, str) or not _DOTTED_RE.match(name) or any(p.startswith("__") for p in name.split(".")):
        raise ModelError(f"{where}: {name!r} is not a dotted class name")
    if short_ok and "." not in name:
        return  # looked up among dynamic_network_architectures.architectures, as nnU-Net does
    if not any(name.startswith(p + ".") for p in packages):
        raise ModelError(
            f"{where}: {name!r} is outside the packages an import may use ({', '.join(packages)}); "
            "custom network code cannot be imported"
        )
