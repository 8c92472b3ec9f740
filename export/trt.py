"""TensorRT engines from the exported ONNX graphs (TensorRT 10 Python API).

Every decision that doesn't need TensorRT (profiles, cache keys, rebuild decisions, manifest records) is a plain
function tested in CI; the tensorrt calls are kept thin in `build_engine`."""
from __future__ import annotations

from pathlib import Path

from unclip.export.artifacts import (ExportError, atomic_write_bytes, file_record, read_manifest, sha256_json,
                                     write_manifest, export_lock)

BUILDER_FLAGS = ("FP16", "STRONGLY_TYPED_NORMS")  # fp16 kernels, normalisations pinned to fp32


def require_tensorrt():
    """Import tensorrt and check for a GPU, or raise one line saying what to install."""
    try:
        import tensorrt as trt
    except ImportError:
        raise ExportError("--trt needs TensorRT 10: pip install tensorrt (NVIDIA's wheels, on a machine with an "
                          "NVIDIA GPU and driver)") from None
    import torch
    if not torch.cuda.is_available():
        raise ExportError("--trt needs an NVIDIA GPU, and torch sees none here")
    return trt


def profile_shapes(entry: dict) -> dict[str, tuple[tuple, tuple, tuple]]:
    """Per input: (min, opt, max) shapes from the network's batch profile in the manifest."""
    lo, opt, hi = entry["profile"]
    out = {}
    for name, shape, _ in entry["inputs"]:
        out[name] = tuple(tuple(b if d == "B" else d for d in shape) for b in (lo, opt, hi))
    return out


def cache_key(onnx_sha256: str, profile: dict, flags: tuple[str, ...], trt_version: str, gpu_name: str,
              compute_capability: tuple[int, int]) -> str:
    """Everything an engine depends on: a change of any of these rebuilds it."""
    return sha256_json({"onnx": onnx_sha256, "profile": profile, "flags": list(flags), "trt": trt_version,
                        "gpu": gpu_name, "cc": list(compute_capability)})


def needs_rebuild(entry: dict, key: str, out_dir: Path, force: bool = False) -> bool:
    trt_rec = entry.get("trt")
    if force or not trt_rec or trt_rec.get("key") != key:
        return True
    rec = trt_rec["file"]
    path = out_dir / rec["name"]
    return not path.is_file() or path.stat().st_size != rec["size"]


def onnx_sha(entry: dict) -> str:
    return sha256_json({k: v["sha256"] for k, v in sorted(entry["files"].items())})


def build_engine(trt, onnx_path: Path, shapes: dict, timing_cache: Path) -> bytes:  # pragma: no cover - needs TRT
    """ONNX -> serialized engine: fp16, one optimisation profile, norms kept in fp32 by precision constraints."""
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        raise ExportError(f"{onnx_path}: TensorRT can't parse it: {parser.get_error(0)}")
    config = builder.create_builder_config()
    config.set_flag(trt.BuilderFlag.FP16)
    config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if layer.type == trt.LayerType.NORMALIZATION or layer.type == trt.LayerType.SOFTMAX:
            layer.precision = trt.float32
    profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in shapes.items():
        profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(profile)
    cache = config.create_timing_cache(timing_cache.read_bytes() if timing_cache.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    engine = builder.build_serialized_network(network, config)
    if engine is None:
        raise ExportError(f"{onnx_path}: TensorRT failed to build an engine")
    atomic_write_bytes(timing_cache, memoryview(config.get_timing_cache().serialize()).tobytes())
    return bytes(engine)


def build_engines(out_dir, force: bool = False, progress=print) -> None:  # pragma: no cover - needs TRT
    trt = require_tensorrt()
    import torch
    out = Path(out_dir)
    with export_lock(out):
        manifest = read_manifest(out, f"unclip-export --out {out}")
        gpu = torch.cuda.get_device_name()
        cc = torch.cuda.get_device_capability()
        for name, entry in manifest["networks"].items():
            shapes = profile_shapes(entry)
            key = cache_key(onnx_sha(entry), {k: list(v) for k, v in shapes.items()}, BUILDER_FLAGS,
                            trt.__version__, gpu, cc)
            if not needs_rebuild(entry, key, out, force):
                progress(f"{name}: TensorRT engine unchanged")
                continue
            onnx_file = out / next(f for f in entry["files"] if f.endswith(".onnx"))
            plan = out / f"{name}.plan"
            atomic_write_bytes(plan, build_engine(trt, onnx_file, shapes, out / "timing.cache"))
            entry["trt"] = {"key": key, "file": {"name": plan.name, **file_record(plan)}, "gpu": gpu, "cc": list(cc),
                            "version": trt.__version__}
            write_manifest(out, manifest)
            progress(f"{name}: TensorRT engine built")
