"""One inference interface for every weights format: a PyTorch checkpoint (.pt), an ONNX file (.onnx, run by ONNX
Runtime) or a TorchScript file (.torchscript). val.py, detect.py and the hub model call ``load_backend`` and then only
use :class:`Backend`, so letterboxing, NMS and box scaling are the same code for all three.

Exported files carry their metadata (class names, stride, input size; see ``engine.exporter``): ONNX in
``metadata_props``, TorchScript in the ``config.json`` extra file.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from engine.checkpoint import load_model
from utils.general import ConfigError, import_optional

SUFFIXES = (".pt", ".onnx", ".torchscript")
META_KEYS = ("names", "stride", "imgsz", "batch", "dynamic")


class Backend:
    """A detector behind one call: ``backend(x)`` maps (N, 3, H, W) float RGB 0..1 to decoded predictions
    (N, A, 5 + nc): cx, cy, w, h in input pixels, objectness and class scores (the Detect head's eval output).

    ``fixed_shape``: (H, W) the file only accepts (exported without --dynamic), else None (any stride multiple).
    ``batch``: the only batch size the file accepts, else None; larger or smaller inputs are run in chunks of it.
    """

    kind = "base"

    def __init__(self, names: list[str], stride: int, device: torch.device, fixed_shape: tuple[int, int] | None = None,
                 batch: int | None = None) -> None:
        self.names = [str(n) for n in names]
        self.stride = int(stride)
        self.device = device
        self.fixed_shape = fixed_shape
        self.batch = batch
        self.channels_last = False  # whether inputs should come in channels_last memory format

    @property
    def nc(self) -> int:
        return len(self.names)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.fixed_shape is not None and tuple(x.shape[2:]) != tuple(self.fixed_shape):
            raise ConfigError(f"{self.kind} model takes {self.fixed_shape[0]}x{self.fixed_shape[1]} inputs, got "
                              f"{x.shape[2]}x{x.shape[3]} (export with --dynamic for other sizes)")
        if self.batch is None or x.shape[0] == self.batch:
            return self.forward(x)
        outs = []
        for chunk in x.split(self.batch):  # a fixed-batch file: run in chunks, zero-pad the last one
            n = chunk.shape[0]
            if n < self.batch:
                chunk = torch.cat((chunk, chunk.new_zeros((self.batch - n, *chunk.shape[1:]))))
            outs.append(self.forward(chunk)[:n])
        return torch.cat(outs)


class TorchBackend(Backend):
    """A PyTorch nn.Module (a loaded checkpoint, or the EMA model during training)."""

    kind = "pytorch"

    def __init__(self, model: nn.Module) -> None:
        names = [str(n) for n in getattr(model, "names", None) or []]
        det = model.model[-1] if isinstance(getattr(model, "model", None), nn.Sequential) else None
        nc = int(det.nc) if det is not None else len(names)  # any nn.Module with names works (tests' oracles)
        stride = int(model.stride.max()) if hasattr(model, "stride") else 32
        super().__init__(names if len(names) == nc else [str(i) for i in range(nc)], stride,
                         next(model.parameters()).device)
        self.model = model
        self.channels_last = feeds_channels_last(model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x)
        return out[0] if isinstance(out, (list, tuple)) else out


class TorchScriptBackend(Backend):
    """A traced TorchScript file written by export.py."""

    kind = "torchscript"

    def __init__(self, path: Path, device: torch.device) -> None:
        extra = {"config.json": ""}
        try:
            self.module = torch.jit.load(str(path), map_location=device, _extra_files=extra).eval()
        except Exception as e:  # a corrupt zip / not a TorchScript archive: many exception types, one meaning
            raise ConfigError(f"'{path}' cannot be read as a TorchScript model ({_first_line(e)})") from None
        meta = parse_metadata(extra["config.json"], path)
        super().__init__(meta["names"], meta["stride"], device, *_shape_batch(meta))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x.to(self.device))


class OnnxBackend(Backend):
    """An ONNX file run by ONNX Runtime: the CUDA provider on a CUDA device when installed, else the CPU one."""

    kind = "onnx"

    def __init__(self, path: Path, device: torch.device, threads: int = 0) -> None:
        ort = import_optional("onnxruntime", "running an .onnx model")
        providers = ["CPUExecutionProvider"]
        if device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or torch.get_num_threads()  # as torch: comparable timings
        try:
            self.session = ort.InferenceSession(str(path), sess_options=opts, providers=providers)
        except Exception as e:  # ORT raises its own Fail / InvalidProtobuf / RuntimeException types
            raise ConfigError(f"'{path}' cannot be read as an ONNX model ({_first_line(e)})") from None
        meta = parse_metadata(self.session.get_modelmeta().custom_metadata_map, path)
        self.input_name = self.session.get_inputs()[0].name
        width = self.session.get_outputs()[0].shape[-1]
        if isinstance(width, int) and width != len(meta["names"]) + 5:  # metadata of another model pasted in?
            raise ConfigError(f"'{path}': its output has {width - 5} class scores but its metadata names "
                              f"{len(meta['names'])} classes")
        out_device = device if "CUDAExecutionProvider" in self.session.get_providers() else torch.device("cpu")
        super().__init__(meta["names"], meta["stride"], out_device, *_shape_batch(meta))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        inp = x.detach().float().cpu().contiguous().numpy()
        out = self.session.run(None, {self.input_name: inp})[0]
        return torch.from_numpy(out).to(self.device)


def feeds_channels_last(model: nn.Module) -> bool:
    """True when the model's convs are channels_last (load_model does that on CPU): feed it so, no conversions."""
    conv_w = next((m.weight for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    return (conv_w is not None and not conv_w.is_contiguous()
            and conv_w.is_contiguous(memory_format=torch.channels_last))


def as_backend(model: nn.Module | Backend) -> Backend:
    """A Backend as it is; an nn.Module wrapped in a TorchBackend (training's validation passes the EMA model)."""
    return model if isinstance(model, Backend) else TorchBackend(model)


def load_backend(weights: str | Path, device: torch.device) -> Backend:
    """The Backend for a weights file, chosen by its suffix (.pt, .onnx, .torchscript); a missing or unreadable file
    is a ConfigError naming it."""
    path = Path(weights)
    if path.suffix not in SUFFIXES:
        raise ConfigError(f"weights '{path}': unknown format '{path.suffix}' (expected one of {', '.join(SUFFIXES)})")
    if not path.is_file():
        raise ConfigError(f"weights '{path}' not found")
    if path.suffix == ".onnx":
        return OnnxBackend(path, device)
    if path.suffix == ".torchscript":
        return TorchScriptBackend(path, device)
    return TorchBackend(load_model(path, device))


def parse_metadata(raw: str | bytes | dict[str, str], path: Path) -> dict[str, Any]:
    """The metadata export.py writes, as values: names (list), stride (int), imgsz [h, w], batch (int), dynamic (bool).

    ``raw``: TorchScript's config.json text, or ONNX's metadata_props as a dict of JSON strings."""
    try:
        meta = json.loads(raw) if isinstance(raw, (str, bytes)) else {k: json.loads(v) for k, v in raw.items()
                                                                if k in META_KEYS}
    except (ValueError, TypeError):
        meta = {}
    missing = [k for k in META_KEYS if k not in meta]
    if missing or not isinstance(meta["names"], list):
        raise ConfigError(f"'{path}' has no NormYOLO metadata (missing {missing or ['names']}); export it with "
                          "export.py")
    return meta


def _shape_batch(meta: dict[str, Any]) -> tuple[tuple[int, int] | None, int | None]:
    if meta["dynamic"]:
        return None, None
    return (int(meta["imgsz"][0]), int(meta["imgsz"][1])), int(meta["batch"])


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:160]

