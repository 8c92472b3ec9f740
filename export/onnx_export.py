"""Export every network to ONNX (opset 17), check it in onnxruntime against the torch module, and record it in
the manifest. Re-running skips networks whose inputs (weights, contract, options, versions) are unchanged."""
from __future__ import annotations

import hashlib
import json
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
from unclip.core.artifacts import (
    FORMAT,
    MANIFEST,
    ExportError,
    export_lock,
    file_record,
    read_manifest,
    sha256_json,
    verify_files,
    write_manifest,
)
from unclip.core.contract import Contract, contracts
from unclip.core.identity import same_model, source_path
from unclip.core.spec import ModelSpec, spec_from_model
from unclip.core.stages import NETWORK_STAGE as NETWORKS
from unclip.core.stages import STAGES

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


def config_key(net: nn.Module) -> str:
    """A hash of the network's config: what shapes its graph besides its weights (an activation, an epsilon, a head
    count can change with the same tensors). Recorded beside each network's key, so that an export after the model
    folder was edited keeps exactly the networks whose weights and config are both unchanged."""
    from unclip.models.common import config_to_dict
    return sha256_json(config_to_dict(net.config))


def versions() -> dict:
    import onnx
    out = {"torch": torch.__version__, "onnx": onnx.__version__}
    try:
        import onnxruntime
        out["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        out["onnxruntime"] = None
    return out


# The form of the graphs this exporter writes, part of each network's export key: bump it when the same weights
# would be written as different graphs, so that `unclip-export` replaces graphs of an older form. 2: large GroupNorm
# groups reduced in two stages and written as Pow / Sqrt / Div (OpenVINO's MVN pattern, engine.backend_ov).
GRAPH_FORM = 2

LONG_REDUCTION = 1 << 16  # elements per GroupNorm group above which the export splits the reduction


def _split_group_norm(m: nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
    """GroupNorm as the export writes it for large groups: mean and (centred) variance each reduced in two stages,
    over the width, then over the rest. onnxruntime's InstanceNormalization (what torch exports GroupNorm as) sums
    a group in one pass of fp32 additions: over the 2 x 512 x 512 elements of the demo's sr1024 groups that is
    1.4e-4 of the output scale away from float64 (torch: 2.6e-6); two stages of ~512 and ~1024 terms bring it
    under the gate's 1e-4. Small groups keep torch's export."""
    N, C, H, W = x.shape
    if (C // m.num_groups) * H * W <= LONG_REDUCTION:
        return nn.functional.group_norm(x, m.num_groups, m.weight, m.bias, m.eps)
    g = x.reshape(N, m.num_groups, (C // m.num_groups) * H, W)
    d = g - g.mean(dim=3, keepdim=True).mean(dim=2, keepdim=True)
    var = d.pow(2).mean(dim=3, keepdim=True).mean(dim=2, keepdim=True)
    y = (d / torch.sqrt(var + m.eps)).reshape(N, C, H, W)  # Pow, Sqrt, Div: OpenVINO's MVN pattern (backend_ov)
    return y * m.weight.view(1, C, 1, 1) + m.bias.view(1, C, 1, 1) if m.affine else y


class _SplitGroupNorms:
    """While exporting: every 4-D GroupNorm of `net` runs `_split_group_norm` (restored on exit; the caller's
    modules are not changed)."""

    def __init__(self, net: nn.Module):
        self.mods = [m for m in net.modules() if isinstance(m, nn.GroupNorm)]

    def __enter__(self):
        for m in self.mods:
            m.forward = (lambda x, m=m: _split_group_norm(m, x) if x.dim() == 4 else nn.GroupNorm.forward(m, x))

    def __exit__(self, *exc):
        for m in self.mods:
            del m.forward


def _export_onnx(wrapper: nn.Module, c: Contract, spec: ModelSpec, path: Path) -> list[str]:
    """torch -> ONNX into `path`'s directory; returns the files written (graph + external data when > 2 GB)."""
    import onnx
    inp = c.sample_inputs(2, spec)
    names_in = [t.name for t in c.inputs]
    names_out = [t.name for t in c.outputs]
    with warnings.catch_warnings(), _SplitGroupNorms(wrapper):
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
    try:  # graphsurgeon folds with onnxruntime sessions of its own: keep their optimiser notes off the console
        import onnxruntime
        onnxruntime.set_default_logger_severity(3)
    except ImportError:
        pass
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
    for b in batches:  # NaN anywhere makes the error NaN (max() would skip it)
        inp = c.sample_inputs(b, spec, seed=100 + b)
        outs = sess.run(None, {k: v.numpy() for k, v in inp.items()})
        with torch.no_grad():
            ref = net(*[inp[t.name] for t in c.inputs])
        ref = ref if isinstance(ref, tuple) else (ref,)
        for o, r in zip(outs, ref):
            r = r.float().numpy()
            scale = max(float(np.abs(r).max()), 1e-6)
            err = float(np.abs(o - r).max()) / scale
            l2 = float(np.linalg.norm(o - r) / max(np.linalg.norm(r), 1e-12))
            if not np.isfinite(r).all() or not np.isfinite(o).all():
                err = l2 = float("nan")
            worst_abs = err if err != err else max(worst_abs, err)
            worst_l2 = l2 if l2 != l2 else max(worst_l2, l2)
    return worst_abs, worst_l2


def export_model(model, out_dir: str | os.PathLike, stages: list[str] | None = None, precision: str = "fp32",
                 max_batch: int = 4, force: bool = False, source: str = "", progress=None) -> list[NetworkReport]:
    """Export the chosen stages of an UnCLIPModel into out_dir; returns one report per network. The caller's
    model is not changed. `source` (a model name or folder) is recorded with its fingerprint, which runs check.

    The manifest is updated after each network (a stopped export keeps what it finished, and a run finishes the
    rest); a network's entry is removed before its files are replaced, so no entry ever describes other files."""
    if precision not in TOLERANCE:
        raise ExportError(f"precision {precision!r} is not one of {', '.join(TOLERANCE)}")
    out = Path(out_dir)
    nets = {k: _cpu_fp32(v) for k, v in model.networks().items()}
    spec = spec_from_model(model)
    cs = contracts(spec, max_batch)
    wanted = _networks_for(stages, cs)
    fix = f"unclip-export --model {source or spec.name} --out {out}"
    try:
        return _export(nets, spec, cs, wanted, out, _Options(precision, max_batch, force, source, fix), progress)
    except OSError as e:  # a read-only folder, a full disk: nothing half-written is trusted (see above)
        raise ExportError(f"{out}: cannot write the export ({e.strerror or e}); choose a writable folder for the "
                          "engines (or free some space on a full disk), then run the export again") from None


@dataclass(frozen=True)
class _Options:
    precision: str
    max_batch: int
    force: bool
    source: str
    fix: str


def _export(nets, spec: ModelSpec, cs: dict, wanted: list[str], out: Path, o: _Options, progress
            ) -> list[NetworkReport]:
    precision, max_batch, force, source, fix = o.precision, o.max_batch, o.force, o.source, o.fix
    reports = []
    with export_lock(out):
        _remove_stale_temporaries(out)
        manifest = _start_manifest(out, source, spec, force, fix)
        options = {"precision": precision, "opset": OPSET, "max_batch": max_batch}
        ver = versions()
        manifest.update(format=FORMAT, spec=spec.to_json(), source=source, options=options, versions=ver,
                        fingerprint=_fingerprint(source), source_path=source_path(source) if source else None)
        # every entry's key and config checked against today's networks before anything is written (the manifest
        # takes today's fingerprint and options): one of a network not exported now must not pass for current
        current = {n: (sha256_json({"weights": weights_hash(nets[n]), "contract": repr(cs[n]), "options": options,
                                    "versions": ver, "graph_form": GRAPH_FORM}), config_key(nets[n]))
                   for n in cs if n in wanted or n in manifest["networks"]}
        # an entry without a config record (exported before it was kept) is here only when the folder is unchanged
        # since (_start_manifest): its config is today's
        manifest["networks"] = {n: {**e, "config": current[n][1]} for n, e in manifest["networks"].items()
                                if n in current and e.get("key") == current[n][0]
                                and e.get("config", current[n][1]) == current[n][1]}
        for name in wanted:
            c, (key, ck) = cs[name], current[name]
            entry = manifest["networks"].get(name)
            if not force and entry and _intact(out, entry, name):
                reports.append(NetworkReport(name, True, sum(r["size"] for r in entry["files"].values()), 0.0,
                                             entry["max_abs"], entry["rel_l2"]))
            else:
                manifest["networks"][name] = {**_export_network(nets[name], c, spec, out, manifest, precision, key),
                                              "config": ck}
                entry = manifest["networks"][name]
                write_manifest(out, manifest)
                reports.append(NetworkReport(name, False, sum(r["size"] for r in entry["files"].values()),
                                             entry["export_s"], entry["max_abs"], entry["rel_l2"]))
            if progress:
                progress(reports[-1])
        try:
            on_disk = read_manifest(out, fix)
        except ExportError:
            on_disk = None
        if on_disk != json.loads(json.dumps(manifest)):  # networks kept but the record changed: the model folder
            write_manifest(out, manifest)  # was copied, touched or edited elsewhere since (today's fingerprint)
    return reports


def _export_network(net: nn.Module, c: Contract, spec: ModelSpec, out: Path, manifest: dict, precision: str,
                    key: str) -> dict:
    t0 = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix=f".{c.network}.", dir=out))
    try:
        files = _export_onnx(_prepare(net, precision), c, spec, tmp / f"{c.network}.onnx")
        max_abs, rel_l2 = gate(net, c, spec, tmp / f"{c.network}.onnx")
        if not max_abs <= TOLERANCE[precision]:  # NaN fails too
            raise ExportError(f"{c.network}: the {precision} ONNX graph differs from the torch module by "
                              f"{max_abs:.3g} of the output scale (tolerance {TOLERANCE[precision]}); nothing was "
                              "written for this network" + (" (the torch module itself gives NaN or inf: check the "
                                                            "model's weights)" if max_abs != max_abs else ""))
        manifest["networks"].pop(c.network, None)
        write_manifest(out, manifest)  # the old files are about to be replaced: forget them first
        for f in files:
            os.replace(tmp / f, out / f)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"files": {f: file_record(out / f) for f in files}, "key": key, "max_abs": max_abs, "rel_l2": rel_l2,
            "export_s": time.perf_counter() - t0, **c.to_manifest(), "profile": list(c.profile)}


def _cpu_fp32(net: nn.Module) -> nn.Module:
    """The network itself if it is on the CPU in fp32 (the export only reads it), else a converted copy."""
    p = next(net.parameters(), None)
    if p is None or (p.device.type == "cpu" and p.dtype == torch.float32):
        return net.eval()
    import copy
    return copy.deepcopy(net).to("cpu", torch.float32).eval()


def _fingerprint(source: str) -> str | None:
    if not source:
        return None
    from unclip.core.identity import fingerprint
    try:
        return fingerprint(source)
    except OSError:
        return None


def _sizes(spec_json: str | None) -> dict | None:
    """A spec without its default guidance scales and steps (they live in the model folder; engines don't depend on
    them)."""
    return None if spec_json is None else {k: v for k, v in json.loads(spec_json).items() if k != "defaults"}


def _start_manifest(out: Path, source: str, spec: ModelSpec, force: bool, fix: str) -> dict:
    """The folder's manifest to update, or a new one. Engines of another model are replaced only with force."""
    try:
        manifest = read_manifest(out, fix)
    except ExportError:
        foreign = _foreign_files(out)
        if foreign and not force:
            raise ExportError(f"{out} holds files that are not engines of this tool ({', '.join(foreign[:3])}"
                              f"{', ...' if len(foreign) > 3 else ''}); choose an empty or new folder for the "
                              f"engines, or export into this one anyway (same names are replaced): {fix} --force")
        return {"format": FORMAT, "networks": {}}
    same = _sizes(manifest.get("spec")) == _sizes(spec.to_json()) and manifest.get("source_path") == (
        source_path(source) if source else None)
    if same and (not source or same_model(manifest.get("fingerprint"), source)):
        return manifest
    if same:  # the same model folder, edited, copied over or touched since: a network is kept where its weights
        # and config are unchanged (its key and config record); one exported before configs were recorded is not
        return {**manifest, "networks": {n: e for n, e in manifest["networks"].items() if "config" in e}}
    if not force and manifest["networks"]:
        raise ExportError(f"{out} holds engines of {manifest.get('source') or 'another model'!r}; choose another "
                          f"--out, or replace them: {fix} --force")
    return {"format": FORMAT, "networks": {}}


def _foreign_files(out: Path) -> list[str]:
    """What a folder without a manifest of this tool holds (hidden names aside: the lock, temporaries): an export
    writes its manifest before it places any file, so anything here is a user's. A manifest.json that isn't JSON
    with a "format" is a user's too; one of another format makes the folder an older export of this tool."""
    path = out / MANIFEST
    try:
        ours = isinstance(json.loads(path.read_text()).get("format"), int)
    except (OSError, ValueError, AttributeError):
        ours = False
    return [] if ours else sorted(p.name for p in out.iterdir() if not p.name.startswith("."))


def _remove_stale_temporaries(out: Path) -> None:
    """Temporary folders of exports that were killed (this one holds the lock: no other export is live)."""
    for p in out.iterdir():
        if p.is_dir() and p.name.startswith(".") and p.name.split(".")[1] in NETWORKS:
            shutil.rmtree(p, ignore_errors=True)


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
        for n in STAGES[s].networks:
            if n not in cs:
                raise ExportError(f"this model has no {s} stage")
            out.append(n)
    return out
