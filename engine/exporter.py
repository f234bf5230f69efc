"""Export a NormYOLO model to ONNX and TorchScript (export.py is the command line).

The exported graph is the eval-mode model with BN / SyncBN / FrozenBN folded into the convs and GN / LN / IN kept
as layers (their statistics are per image, so they cannot be folded). Its output is the Detect head's decoded
prediction (N, A, 5 + nc), the same tensor ``engine.backends.Backend`` returns for a .pt file. Class names, stride
and input size travel inside the file (``metadata``), so val.py / detect.py need nothing else.
"""
from __future__ import annotations

import copy
import json
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from models.yolo import Detect, describe_norm
from utils.general import LOGGER, ConfigError, import_optional

DEFAULT_OPSET = 17  # GroupNorm exports as InstanceNormalization + reshapes; every ONNX Runtime >= 1.14 runs it
INPUT, OUTPUT = "images", "output0"


def prepare_for_export(model: nn.Module) -> nn.Module:
    """A float32 CPU copy in eval mode with BN folded, no gradients and fresh Detect grids (built during tracing)."""
    m = copy.deepcopy(model).float().cpu().eval()
    m.to(memory_format=torch.contiguous_format)
    m.fuse()
    m.requires_grad_(False)
    for det in m.modules():
        if isinstance(det, Detect):
            det._grids = {}  # cached grids would enter the graph as constants of the cached size
    return m


def metadata(model: nn.Module, imgsz: tuple[int, int], batch: int, dynamic: bool) -> dict[str, str]:
    """The values val.py / detect.py need to run the file, each JSON-encoded (ONNX metadata_props are strings)."""
    meta = {"names": [str(n) for n in model.names], "nc": len(model.names), "stride": int(model.stride.max()),
            "imgsz": list(imgsz), "batch": batch, "dynamic": dynamic, "norm": describe_norm(model.yaml),
            "producer": "NormYOLO export.py"}
    return {k: json.dumps(v) for k, v in meta.items()}


def run_traceable(model: nn.Module, x: torch.Tensor, fn: Any) -> Any:
    """Call ``fn`` (a tracer) with grad mode on: Detect then takes its out-of-place decode, which traces as plain
    ops; its in-place inference decode writes into views of one buffer, which tracers record poorly. No weight
    requires grad (prepare_for_export), so nothing is recorded for autograd."""
    with torch.enable_grad():
        return fn(model, x)


def export_torchscript(model: nn.Module, x: torch.Tensor, path: Path, meta: dict[str, str]) -> Path:
    """Trace ``model`` on ``x`` (N, 3, H, W) and save it with ``config.json`` (the metadata) as an extra file."""
    traced = run_traceable(model, x, lambda m, inp: torch.jit.trace(m, inp, strict=False, check_trace=False))
    extra = json.dumps({k: json.loads(v) for k, v in meta.items()})
    traced.save(str(path), _extra_files={"config.json": extra})
    return path


def export_onnx(model: nn.Module, x: torch.Tensor, path: Path, meta: dict[str, str], opset: int = DEFAULT_OPSET,
                dynamic: bool = False) -> Path:
    """torch.onnx.export (the TorchScript-based exporter: no onnxscript dependency), then write the metadata into
    ``metadata_props`` and run ``onnx.checker``. ``dynamic``: batch, height and width become free axes."""
    onnx = import_optional("onnx", "ONNX export")
    axes = {INPUT: {0: "batch", 2: "height", 3: "width"}, OUTPUT: {0: "batch", 1: "anchors"}} if dynamic else None
    try:
        run_traceable(model, x, lambda m, inp: torch.onnx.export(
            m, (inp,), str(path), dynamo=False, opset_version=opset, input_names=[INPUT], output_names=[OUTPUT],
            dynamic_axes=axes, do_constant_folding=True))
    except (ValueError, RuntimeError) as e:  # e.g. an opset this torch cannot write
        raise ConfigError(f"ONNX export at opset {opset} failed: {str(e).strip().splitlines()[0][:200]}") from None
    write_onnx_metadata(path, meta)
    return path


def write_onnx_metadata(path: Path, meta: dict[str, str]) -> None:
    """Set ``metadata_props`` (replacing earlier values) and check the file with ``onnx.checker``."""
    onnx = import_optional("onnx", "ONNX export")
    proto = onnx.load(str(path))
    del proto.metadata_props[:]
    for k, v in meta.items():
        proto.metadata_props.add(key=k, value=v)
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))


def simplify_onnx(path: Path, meta: dict[str, str]) -> tuple[int, int]:
    """Rewrite the file with ONNX Runtime's basic graph optimizations (constant folding, redundant node removal;
    the level whose output stays portable across providers). Returns the node counts before and after."""
    onnx = import_optional("onnx", "ONNX export")
    ort = import_optional("onnxruntime", "simplifying an ONNX file")
    before = len(onnx.load(str(path)).graph.node)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    tmp = path.with_suffix(".simplified.onnx")
    opts.optimized_model_filepath = str(tmp)
    ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
    tmp.replace(path)
    write_onnx_metadata(path, meta)  # the optimizer keeps the graph, not our metadata
    return before, len(onnx.load(str(path)).graph.node)


def max_abs_diff(a: torch.Tensor, b: torch.Tensor, img: int | None = None) -> float:
    """Largest |a - b| over two (N, A, 5 + nc) outputs (inf when the shapes differ). With ``img``, the box
    columns (cx, cy, w, h in pixels) are divided by it first, so scores and boxes share one scale-free unit."""
    if a.shape != b.shape:
        return float("inf")
    if not a.numel():
        return 0.0
    d = (a.float() - b.float()).abs()
    if img:
        d[..., :4] /= img
    return float(d.max())


FORMATS = {"onnx": ".onnx", "torchscript": ".torchscript"}
# largest |exported - PyTorch| accepted on the raw (decoded, pre-NMS) outputs: scores, and boxes / input size (a
# box of a 320 px input may move 0.32 px). Float32 pixel values near 320 are only exact to ~3e-5 px, and different
# conv kernels round differently, so an absolute pixel limit would test the rounding, not the export.
CHECK_ATOL = 1e-3


class ExportMismatch(RuntimeError):
    """An exported file's outputs differ from PyTorch's by more than CHECK_ATOL."""


def check_inputs(include: list[str], img: int, batch: int, opset: int) -> list[str]:
    """The --include names, lower-cased and de-duplicated; ConfigError for an unknown name or impossible sizes.
    Also fails early, before any work, when a package the export needs is missing."""
    names = list(dict.fromkeys(n.lower() for n in include))
    unknown = [n for n in names if n not in FORMATS]
    if unknown or not names:
        raise ConfigError(f"--include {' '.join(unknown) or '(none)'}: unknown format; choose from "
                          f"{', '.join(FORMATS)}")
    if img < 32 or img % 32 or batch < 1:
        raise ConfigError(f"--img {img} / --batch-size {batch}: expected a multiple of 32 and a positive batch")
    if not 9 <= opset <= 20:  # what torch.onnx's TorchScript exporter writes
        raise ConfigError(f"--opset {opset}: expected 9 to 20 (default {DEFAULT_OPSET})")
    if "onnx" in names:
        import_optional("onnx", "ONNX export")
        import_optional("onnxruntime", "checking the ONNX file")
    return names


def check_image(source: str | Path | None) -> tuple[Any, str]:
    """The BGR image the exported files are checked on: ``source``, else a rendered built-in dataset image (real
    content, no file or download needed)."""
    import cv2

    if source:
        img = cv2.imread(str(source))
        if img is None:
            raise ConfigError(f"--source {source}: not a readable image")
        return img, str(source)
    from data.synthetic import render_image

    return render_image(0, "val", 0)[0], "built-in dataset val image 0"


def verify(backend: Any, reference: nn.Module, x: torch.Tensor, kind: str, atol: float = CHECK_ATOL) -> float:
    """Max |backend(x) - reference(x)| over the raw outputs (decoded, before NMS; boxes in units of the input
    size); ExportMismatch above ``atol``, saying whether a float64 run of the model sides with PyTorch or the file."""
    img = max(x.shape[2:])
    with torch.inference_mode():
        out, ref = backend(x), reference(x)
    diff = max_abs_diff(out, ref, img)
    if diff <= atol:
        return diff
    model64 = copy.deepcopy(reference).double()  # outside inference_mode: its buffers stay normal tensors
    with torch.inference_mode():
        exact = model64(x.double())
    raise ExportMismatch(f"{kind}: max |exported - PyTorch| = {diff:.3g} on the check image exceeds {atol:g}; "
                         f"against float64 the file is off by {max_abs_diff(out, exact, img):.3g}, PyTorch float32 "
                         f"by {max_abs_diff(ref, exact, img):.3g}")


def export_weights(weights: str | Path, include: list[str], *, img: int | None = None, batch: int = 1,
                   dynamic: bool = False, opset: int = DEFAULT_OPSET, simplify: bool = True,
                   source: str | Path | None = None, atol: float = CHECK_ATOL) -> dict[str, dict[str, Any]]:
    """Export a .pt checkpoint (EMA weights) to each format of ``include``, beside it (best.pt -> best.onnx,
    best.torchscript), and check every file through ``engine.backends`` against PyTorch on a real image.

    ``img``: square input size (default: the size the checkpoint trained at, else 640). ``dynamic``: free batch
    and image size in the ONNX file (TorchScript traces are always size-free here, and checked at two shapes).
    ``atol``: the check's limit on max |exported - PyTorch| (boxes in units of the input size).
    Returns per format: path, seconds, megabytes, max_abs_diff (and ONNX node counts before / after simplifying).
    """
    from engine.backends import load_backend
    from engine.checkpoint import load_checkpoint, model_from_checkpoint
    from engine.predict import preprocess

    weights = Path(weights)
    if weights.suffix != ".pt":
        raise ConfigError(f"--weights {weights}: expected a .pt checkpoint to export")
    ckpt = load_checkpoint(weights)
    img = img or int((ckpt.get("opt") or {}).get("img", 640))
    formats = check_inputs(include, img, batch, opset)
    model = prepare_for_export(model_from_checkpoint(ckpt))
    stride, cpu = int(model.stride.max()), torch.device("cpu")
    image, label = check_image(source)
    x = preprocess(image, img, stride, cpu, channels_last=False, auto=False)[0].expand(batch, -1, -1, -1).contiguous()
    x_min_pad = preprocess(image, img, stride, cpu, channels_last=False, auto=True)[0]  # a second shape
    out: dict[str, dict[str, Any]] = {}
    for fmt in formats:
        t0, path = time.perf_counter(), weights.with_suffix(FORMATS[fmt])
        meta = metadata(model, (img, img), batch, dynamic or fmt == "torchscript")
        info: dict[str, Any] = {"path": str(path)}
        if fmt == "onnx":
            export_onnx(model, x, path, meta, opset=opset, dynamic=dynamic)
            if simplify:
                info["nodes_before"], info["nodes"] = simplify_onnx(path, meta)
        else:
            export_torchscript(model, x, path, meta)
        backend = load_backend(path, cpu)
        info["max_abs_diff"] = max(verify(backend, model, xi, fmt, atol)
                                   for xi in ((x, x_min_pad) if json.loads(meta["dynamic"]) else (x,)))
        info.update(seconds=time.perf_counter() - t0, megabytes=path.stat().st_size / 1e6)
        LOGGER.info(f"{fmt}: {path} ({info['megabytes']:.1f} MB, {info['seconds']:.1f} s); max |{backend.kind} - "
                    f"PyTorch| = {info['max_abs_diff']:.2e} on {label} (limit {atol:g})")
        out[fmt] = info
    return out
