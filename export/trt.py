"""TensorRT engines from the exported ONNX graphs (TensorRT 10 Python API).

Every decision that doesn't need TensorRT (profiles, cache keys, rebuild decisions, manifest records) is a plain
function tested in CI; the tensorrt calls are kept thin in `build_engine`."""
from __future__ import annotations

from pathlib import Path

from unclip.core.artifacts import (
    ExportError,
    atomic_write_bytes,
    export_lock,
    file_record,
    read_manifest,
    sha256_json,
    write_manifest,
)
from unclip.core.packages import require_tensorrt  # noqa: F401  (the same check for export and runtime)


def builder_flags(precision: str) -> tuple[str, ...]:
    """TensorRT builder flags for an export's precision: fp16 kernels with normalisations and softmax pinned to
    fp32 (OBEY_PRECISION_CONSTRAINTS), or plain fp32 (an fp32 export never silently becomes an fp16 engine)."""
    if precision == "fp16":
        return ("FP16", "OBEY_PRECISION_CONSTRAINTS")
    assert precision == "fp32", precision
    return ()


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


def build_engine(trt, onnx_path: Path, shapes: dict, timing_cache: Path,
                 flags: tuple[str, ...]) -> bytes:  # pragma: no cover - needs TRT
    """ONNX -> serialized engine with `flags` (builder_flags), one optimisation profile; with FP16, norms and
    softmax are kept in fp32 by precision constraints."""
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        raise ExportError(f"{onnx_path}: TensorRT can't parse it: {parser.get_error(0)}")
    config = builder.create_builder_config()
    for flag in flags:
        config.set_flag(getattr(trt.BuilderFlag, flag))
    if "FP16" in flags:
        for i in range(network.num_layers):
            layer = network.get_layer(i)
            if layer.type in (trt.LayerType.NORMALIZATION, trt.LayerType.SOFTMAX):
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
        flags = builder_flags(manifest["options"]["precision"])
        for name, entry in manifest["networks"].items():
            shapes = profile_shapes(entry)
            key = cache_key(onnx_sha(entry), {k: list(v) for k, v in shapes.items()}, flags, trt.__version__, gpu, cc)
            if not needs_rebuild(entry, key, out, force):
                progress(f"{name}: TensorRT engine unchanged")
                continue
            onnx_file = out / next(f for f in entry["files"] if f.endswith(".onnx"))
            plan = out / f"{name}.plan"
            atomic_write_bytes(plan, build_engine(trt, onnx_file, shapes, out / "timing.cache", flags))
            entry["trt"] = {"key": key, "file": {"name": plan.name, **file_record(plan)}, "gpu": gpu, "cc": list(cc),
                            "version": trt.__version__}
            write_manifest(out, manifest)
            progress(f"{name}: TensorRT engine built")
