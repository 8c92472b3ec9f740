"""Export every network to ONNX (opset 17), check it in onnxruntime against the torch module, and record it in
the manifest. Re-running skips networks whose inputs (weights, contract, options, versions) are unchanged."""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from unclip.engine.spec import ModelSpec, spec_from_model
from unclip.export.artifacts import (FORMAT, ExportError, export_lock, file_record, read_manifest, sha256_json,
                                     verify_files, write_manifest)
from unclip.export.contract import STAGES, Contract, contracts

log = logging.getLogger(__name__)

OPSET = 17  # onnxruntime's CPU Attention kernel (opset 23) rejects the decoder's broadcast mask: stay below it
TOLERANCE = {"fp32": 1e-4, "fp16": 2e-2}  # max abs error / output scale, against the fp32 torch module
GATE_BATCHES = (1, 2)
EXTERNAL_DATA_BYTES = 1_900_000_000  # graphs above this keep their tensors in NAME.onnx.data


@dataclass
class NetworkReport:
    network: str
    skipped: bool
    size: int
    seconds: float
    max_abs: float
    rel_l2: float


class _IOWrapper(nn.Module):
    """Keeps graph inputs/outputs float32 whatever the compute precision, so every backend binds the same types.
    Normalisations run in fp32 in an fp16 graph (their sums overflow fp16)."""

    def __init__(self, net: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.net, self.dtype = net, dtype

    def forward(self, *args):
        args = [a.to(self.dtype) if a.is_floating_point() else a for a in args]
        out = self.net(*args)
        out = out if isinstance(out, tuple) else (out,)
        return tuple(o.float() for o in out)


def _fp32_norms(net: nn.Module) -> None:
    def pre(mod, args):
        return tuple(a.float() for a in args)

    def post(mod, args, out):
        return out.half()

    for m in net.modules():
        if isinstance(m, (nn.LayerNorm, nn.GroupNorm)):
            m.float()
            m.register_forward_pre_hook(pre)
            m.register_forward_hook(post)


def _prepare(net: nn.Module, precision: str) -> nn.Module:
    if precision == "fp32":
        return _IOWrapper(net, torch.float32).eval()
    import copy
    half = copy.deepcopy(net).half()
    _fp32_norms(half)
    return _IOWrapper(half, torch.float16).eval()


def weights_hash(net: nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in net.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes() if v.numel() else b"")
    return h.hexdigest()


def versions() -> dict:
    import onnx
    out = {"torch": torch.__version__, "onnx": onnx.__version__}
    try:
        import onnxruntime
        out["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        out["onnxruntime"] = None
    return out


def _export_onnx(wrapper: nn.Module, c: Contract, spec: ModelSpec, path: Path) -> list[str]:
    """torch -> ONNX into `path`'s directory; returns the files written (graph + external data when > 2 GB)."""
    import onnx
    inp = c.sample_inputs(2, spec)
    names_in = [t.name for t in c.inputs]
    names_out = [t.name for t in c.outputs]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(wrapper, tuple(inp[n] for n in names_in), str(path), input_names=names_in,
                          output_names=names_out, opset_version=OPSET, dynamo=False,
                          dynamic_axes={n: {0: "B"} for n in names_in + names_out})
    total = sum(f.stat().st_size for f in path.parent.iterdir())  # graph + any external tensors torch wrote
    model = _fold_constants(onnx.load(str(path), load_external_data=True), path.name)
    for f in path.parent.iterdir():
        f.unlink()
    if total > EXTERNAL_DATA_BYTES:  # protobuf's 2 GB limit: keep the tensors in one side file
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=path.name + ".data", size_threshold=1024)
        return [path.name, path.name + ".data"]
    onnx.save_model(model, str(path))
    return [path.name]


def _fold_constants(model, name: str):
    """Clean-up and constant folding with onnx-graphsurgeon when installed (the `export` extra)."""
    try:
        import onnx_graphsurgeon as gs
    except ImportError:
        return model
    try:
        graph = gs.import_onnx(model)
        graph.fold_constants().cleanup().toposort()
        return gs.export_onnx(graph)
    except Exception as e:  # folding is an optimisation; never fail an export on it
        log.info("constant folding skipped for %s: %s", name, e)
        return model


def ort_session(path: Path):
    import onnxruntime as ort
    ort.set_default_logger_severity(3)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def gate(net: nn.Module, c: Contract, spec: ModelSpec, path: Path, batches=GATE_BATCHES) -> tuple[float, float]:
    """Max abs error relative to the output scale, and relative L2 error, of the ONNX graph vs the fp32 module."""
    sess = ort_session(path)
    worst_abs, worst_l2 = 0.0, 0.0
    for b in batches:
        inp = c.sample_inputs(b, spec, seed=100 + b)
        outs = sess.run(None, {k: v.numpy() for k, v in inp.items()})
        with torch.no_grad():
            ref = net(*[inp[t.name] for t in c.inputs])
        ref = ref if isinstance(ref, tuple) else (ref,)
        for o, r in zip(outs, ref):
            r = r.float().numpy()
            scale = max(float(np.abs(r).max()), 1e-6)
            worst_abs = max(worst_abs, float(np.abs(o - r).max()) / scale)
            worst_l2 = max(worst_l2, float(np.linalg.norm(o - r) / max(np.linalg.norm(r), 1e-12)))
    return worst_abs, worst_l2


def export_model(model, out_dir: str | os.PathLike, stages: list[str] | None = None, precision: str = "fp32",
                 max_batch: int = 4, force: bool = False, source: str = "", progress=None) -> list[NetworkReport]:
    """Export the chosen stages of an UnCLIPModel (torch, fp32) into out_dir; returns one report per network."""
    if precision not in TOLERANCE:
        raise ExportError(f"precision {precision!r} is not one of {', '.join(TOLERANCE)}")
    out = Path(out_dir)
    model = model.to("cpu", torch.float32).eval()
    spec = spec_from_model(model)
    cs = contracts(spec, max_batch)
    nets = model.networks()
    wanted = _networks_for(stages, cs)
    fix = f"unclip-export --model {source or spec.name} --out {out}"
    reports = []
    with export_lock(out):
        try:
            manifest = read_manifest(out, fix)
        except ExportError:
            manifest = {"format": FORMAT, "networks": {}}
        options = {"precision": precision, "opset": OPSET, "max_batch": max_batch}
        ver = versions()
        manifest.update(format=FORMAT, spec=spec.to_json(), source=source, options=options, versions=ver)
        for name in wanted:
            c = cs[name]
            key = sha256_json({"weights": weights_hash(nets[name]), "contract": repr(c), "options": options,
                               "versions": ver})
            entry = manifest["networks"].get(name)
            if not force and entry and entry.get("key") == key and _intact(out, entry, name):
                reports.append(NetworkReport(name, True, sum(r["size"] for r in entry["files"].values()), 0.0,
                                             entry["max_abs"], entry["rel_l2"]))
                if progress:
                    progress(reports[-1])
                continue
            t0 = time.perf_counter()
            tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=out))
            try:
                files = _export_onnx(_prepare(nets[name], precision), c, spec, tmp / f"{name}.onnx")
                max_abs, rel_l2 = gate(nets[name], c, spec, tmp / f"{name}.onnx")
                if max_abs > TOLERANCE[precision]:
                    raise ExportError(f"{name}: the {precision} ONNX graph differs from the torch module by "
                                      f"{max_abs:.3g} of the output scale (tolerance {TOLERANCE[precision]}); "
                                      "nothing was written for this network")
                manifest["networks"].pop(name, None)
                write_manifest(out, manifest)  # the old files are about to be replaced: forget them first
                for f in files:
                    os.replace(tmp / f, out / f)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            entry = {"files": {f: file_record(out / f) for f in files}, "key": key, "max_abs": max_abs,
                     "rel_l2": rel_l2, "export_s": time.perf_counter() - t0,
                     "inputs": [[t.name, list(t.shape), t.dtype] for t in c.inputs],
                     "outputs": [[t.name, list(t.shape), t.dtype] for t in c.outputs], "profile": list(c.profile)}
            manifest["networks"][name] = entry
            write_manifest(out, manifest)
            reports.append(NetworkReport(name, False, sum(r["size"] for r in entry["files"].values()),
                                         entry["export_s"], max_abs, rel_l2))
            if progress:
                progress(reports[-1])
    return reports


def _intact(out: Path, entry: dict, name: str) -> bool:
    try:
        verify_files(out, entry, name, "")
        return True
    except ExportError:
        return False


def _networks_for(stages: list[str] | None, cs: dict[str, Contract]) -> list[str]:
    if not stages or stages == ["all"]:
        return list(cs)
    out = []
    for s in stages:
        if s not in STAGES:
            raise ExportError(f"unknown stage {s!r} (choose from: all, {', '.join(STAGES)})")
        for n in STAGES[s]:
            if n not in cs:
                raise ExportError(f"this model has no {s} stage")
            out.append(n)
    return out
