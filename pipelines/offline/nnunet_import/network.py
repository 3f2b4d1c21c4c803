"""The torch side: rebuild the network from its plans, load one fold's weights, wrap and export it to ONNX."""

from __future__ import annotations

import importlib
import inspect
import io
import pkgutil
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pipelines.errors import ModelError
from pipelines.offline.nnunet_import.plans import LAYER_PACKAGES, NETWORK_PACKAGES

INSTALL_HINT = "pip install 'pacs-ai-node[train]'"

# ---------------------------------------------------------------- torch side


def _resolve_class(name: str, packages: Sequence[str], where: str, base: type) -> type:
    """Import ``name`` (already checked by :func:`_check_dotted`) and require a subclass of ``base``
    defined in one of ``packages``."""
    obj: Any = None
    if "." not in name:
        import dynamic_network_architectures.architectures as archs

        for info in pkgutil.iter_modules(archs.__path__, archs.__name__ + "."):
            try:
                candidate = getattr(importlib.import_module(info.name), name, None)
            except ImportError:
                continue  # an architecture module whose own optional dependency is missing
            if inspect.isclass(candidate):
                obj = candidate
                break
        if obj is None:
            raise ModelError(f"{where}: no class {name!r} in dynamic_network_architectures.architectures")
    else:
        parts = name.split(".")
        for i in range(len(parts) - 1, 0, -1):
            module_name = ".".join(parts[:i])
            try:
                obj = importlib.import_module(module_name)
            except ModuleNotFoundError as exc:
                if exc.name and not module_name.startswith(exc.name):
                    raise ModelError(f"{where}: importing {module_name!r} needs {exc.name!r}: {INSTALL_HINT}") from exc
                continue
            break
        else:
            raise ModelError(f"{where}: cannot import {name!r}")
        for attr in parts[i:]:
            obj = getattr(obj, attr, None)
            if obj is None:
                raise ModelError(f"{where}: {name!r} not found (is dynamic_network_architectures up to date?)")
    if not inspect.isclass(obj) or not issubclass(obj, base):
        raise ModelError(f"{where}: {name!r} is not a {base.__module__}.{base.__name__} class")
    if not any(obj.__module__ == p or obj.__module__.startswith(p + ".") for p in packages):
        raise ModelError(f"{where}: {name!r} resolves to {obj.__module__}.{obj.__name__}, outside {list(packages)}")
    return obj


def _build_network(arch: dict[str, Any], *, n_outputs: int, where: str) -> Any:
    import torch

    cls = _resolve_class(arch["network_class_name"], NETWORK_PACKAGES,
                         f"{where}.architecture.network_class_name", torch.nn.Module)
    kwargs = dict(arch["arch_kwargs"])
    for key in arch["_kw_requires_import"]:
        if kwargs[key] is not None:
            kwargs[key] = _resolve_class(kwargs[key], LAYER_PACKAGES, f"{where}.architecture.arch_kwargs.{key}",
                                         torch.nn.Module)
    params = inspect.signature(cls).parameters
    if "deep_supervision" in params or any(p.kind is p.VAR_KEYWORD for p in params.values()):
        kwargs["deep_supervision"] = False  # inference uses the full-resolution head only; weights load the same
    try:
        return cls(input_channels=1, num_classes=n_outputs, **kwargs)
    except Exception as exc:  # the architectures assert and raise TypeError/ValueError on bad kwargs
        raise ModelError(f"{where}.architecture: {cls.__name__}(**arch_kwargs) fails: {exc!r}") from exc


def _load_checkpoint(path: Path, allow_pickle: bool, warn: list[str]) -> dict[str, Any]:
    import pickle

    import torch

    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if not allow_pickle:
            raise ModelError(
                f"{path}: holds Python objects beyond tensors ({str(exc).splitlines()[0]}) and allow_pickle is off; "
                "nnU-Net checkpoints usually do: load it only if it comes from a source you trust"
            ) from exc
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as exc2:
            raise ModelError(f"{path}: cannot be loaded as a torch checkpoint: {exc2}") from exc2
        warn.append(f"{path.name}: loaded as a full pickle (weights_only=False); it must come from a trusted source")
    except Exception as exc:
        raise ModelError(f"{path}: cannot be loaded as a torch checkpoint: {exc}") from exc
    if not isinstance(ckpt, dict):
        raise ModelError(f"{path}: holds a {type(ckpt).__name__}, not an nnU-Net checkpoint dict")
    return ckpt


def _mirror_axes(ckpt: dict[str, Any], path: Path, transpose_forward: list[int], warn: list[str]) -> list[int]:
    """nnU-Net's allowed mirroring axes (spatial, in its transposed order) -> the node's Z/Y/X axes."""
    axes = ckpt.get("inference_allowed_mirroring_axes")
    if "inference_allowed_mirroring_axes" not in ckpt:
        warn.append(f"{path.name}: no inference_allowed_mirroring_axes; test-time mirroring is off, as in nnU-Net")
    if axes is None:
        return []
    if not isinstance(axes, (list, tuple)) or not all(isinstance(a, int) and a in (0, 1, 2) for a in axes):
        raise ModelError(f"{path}: inference_allowed_mirroring_axes must be spatial axes 0..2, got {axes!r}")
    return sorted({transpose_forward[a] for a in axes})


def _load_weights(network: Any, state: Mapping[str, Any], path: Path, trainer: str) -> None:
    cleaned = {}
    for key, value in state.items():
        for prefix in ("module.", "_orig_mod."):  # DataParallel / DDP and torch.compile wrappers
            while key.startswith(prefix):
                key = key[len(prefix):]
        cleaned[key] = value
    expected = network.state_dict()
    missing = sorted(set(expected) - set(cleaned))
    unexpected = sorted(set(cleaned) - set(expected))
    wrong = sorted(k for k in set(expected) & set(cleaned)
                   if tuple(getattr(cleaned[k], "shape", ())) != tuple(expected[k].shape))
    if missing or unexpected or wrong:
        details = []
        if missing:
            details.append(f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        if unexpected:
            details.append(f"unexpected {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
        if wrong:
            details.append("shape mismatch " + ", ".join(
                f"{k} {tuple(cleaned[k].shape)} vs {tuple(expected[k].shape)}" for k in wrong[:5]))
        raise ModelError(
            f"{path}: network_weights do not fit the network plans.json describes ({'; '.join(details)}); "
            f"trainer {trainer!r} may build its own architecture, which cannot be imported"
        )
    network.load_state_dict(cleaned, strict=True)


def _wrap(network: Any, tf: list[int], tb: list[int], flips: list[int]) -> Any:
    """The network as the node calls it: NCZYX in LPS order, nnU-Net's transposition and any flips inside."""
    import torch

    if tf == [0, 1, 2] and not flips:
        return network

    class OrientedNetwork(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.network = network

        def forward(self, x: Any) -> Any:
            if flips:
                x = torch.flip(x, [a + 2 for a in flips])
            if tf != [0, 1, 2]:
                x = x.permute(0, 1, *[a + 2 for a in tf])
            y = self.network(x)
            if tf != [0, 1, 2]:
                y = y.permute(0, 1, *[a + 2 for a in tb])
            if flips:
                y = torch.flip(y, [a + 2 for a in flips])
            return y

    return OrientedNetwork()


def _export_onnx(module: Any, example: Any, opset: int) -> bytes:
    """TorchScript-based export with dynamic batch and spatial axes; returns the model bytes."""
    import torch

    axes = {0: "batch", 2: "z", 3: "y", 4: "x"}
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        # The legacy exporter's deprecation notice, tracer notes on shape checks and instance_norm's
        # "train=True" (instance statistics are what nnU-Net uses at inference) are expected.
        warnings.simplefilter("ignore")
        try:
            with torch.no_grad():
                torch.onnx.export(
                    module, (example,), buffer,  # type: ignore[arg-type]  # dynamo=False takes a BytesIO; hint lacks it
                    input_names=["ct"], output_names=["logits"],
                    dynamic_axes={"ct": axes, "logits": axes},
                    opset_version=opset, do_constant_folding=True, dynamo=False,
                )
        except Exception as exc:  # the exporter raises many types
            raise ModelError(f"torch.onnx.export failed at opset {opset}: {exc}") from exc
    return buffer.getvalue()
