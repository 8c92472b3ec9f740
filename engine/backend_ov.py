"""The `openvino` backend: the ONNX graphs of an `unclip-export` folder compiled by OpenVINO for the CPU, in fp32
or, on CPUs with native bf16 (AVX512-BF16 / AMX), in bf16 (OpenVINO's inference precision; the graphs stay fp32;
the networks that make the CLIP embeddings compute in fp32: core.stages.FP32_IN_BF16).
Outputs are the infer request's own tensors, valid until the next call of the same network."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from unclip.core import values
from unclip.core.artifacts import read_manifest, verify_files
from unclip.core.contract import Contract
from unclip.core.errors import BackendUnavailable, ExportError, RequestError
from unclip.core.spec import ModelSpec
from unclip.core.stages import network_precision
from unclip.engine.backend import PRECISIONS, ExportedGraphs, failed

HINTS = {"fp32": "f32", "bf16": "bf16"}  # INFERENCE_PRECISION_HINT
_NP = {"float32": np.float32, "int64": np.int64}
SHAPES_KEPT = 4  # compiled input shapes kept per network
STATIC_MAX_BYTES = 256 << 20  # larger graphs are compiled once, batch dynamic (see OpenVINOBackend._request)


def require_openvino():
    try:
        import openvino
    except ImportError:
        raise BackendUnavailable("the openvino backend needs OpenVINO: pip install openvino") from None
    return openvino


def _ints(node, name: str):
    return next((list(a.ints) for a in node.attribute if a.name == name), None)


def _int(node, name: str):
    return next((a.i for a in node.attribute if a.name == name), None)


def fuse_group_norms(model) -> int:
    """Merge each pair ReduceMean(axes=[3]) -> ReduceMean(axes=[2]) (keepdims, the first read only by the second)
    of an ONNX graph into one ReduceMean(axes=[2, 3]), in place; returns how many. The export writes the mean and
    variance of large GroupNorm groups in two stages for onnxruntime's accuracy (export.onnx_export.
    _split_group_norm); merged, the GroupNorm is the pattern OpenVINO fuses into one MVN kernel, whose own
    accumulation is as accurate (the demo's sr1024 in fp32: 1.4e-6 of the output scale from the unmerged graph) and
    which is faster than the many small ops (that sr1024: 7% less time per call, in bf16 and in fp32). Merging
    means of equal-sized slices is exact, so any graph may pass through."""
    nodes = list(model.graph.node)
    readers: dict[str, list] = {}
    for n in nodes:
        for name in n.input:
            readers.setdefault(name, []).append(n)
    outputs = {o.name for o in model.graph.output}
    merged = set()
    for n in nodes:
        if n.op_type != "ReduceMean" or _ints(n, "axes") != [3] or _int(n, "keepdims") != 1 or n.output[0] in outputs:
            continue
        nxt = readers.get(n.output[0], [])
        if len(nxt) != 1 or nxt[0].op_type != "ReduceMean" or _ints(nxt[0], "axes") != [2] \
                or _int(nxt[0], "keepdims") != 1:
            continue
        second = nxt[0]
        for a in second.attribute:
            if a.name == "axes":
                a.ints[:] = [2, 3]
        second.input[0] = n.input[0]
        merged.add(id(n))
    if merged:
        keep = [n for n in nodes if id(n) not in merged]
        del model.graph.node[:]
        model.graph.node.extend(keep)
    return len(merged)


class OpenVINOBackend(ExportedGraphs):
    name = "openvino"

    def __init__(self, export_dir: str | Path, precision: str = "fp32", fix: str | None = None, threads: int = 0):
        ov = require_openvino()
        if precision not in PRECISIONS["openvino"]:
            raise RequestError(f"--precision {precision!r} is not available with --backend openvino (choose "
                               f"{', '.join(PRECISIONS['openvino'])})")
        self.dir = Path(values.path("engines", export_dir))
        self.fix = fix or f"unclip-export --out {self.dir}"
        self.manifest = read_manifest(self.dir, self.fix)
        try:
            self.spec = ModelSpec.from_json(self.manifest["spec"])
        except (KeyError, TypeError, ValueError) as e:
            raise ExportError(f"{self.dir / 'manifest.json'}: its model description is unreadable ({e}); "
                              f"re-export: {self.fix} --force") from None
        self.core = ov.Core()
        if precision == "bf16" and "BF16" not in self.core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
            raise BackendUnavailable("--precision bf16 with openvino needs a CPU with native bf16 (AVX512-BF16 or "
                                     "AMX); this one has none: use --precision fp32")
        self.precision = precision
        self.config = {"PERFORMANCE_HINT": "LATENCY"}  # and each network's INFERENCE_PRECISION_HINT (compile_config)
        if threads:
            self.config["INFERENCE_NUM_THREADS"] = threads
        self.device = torch.device("cpu")
        self.models: dict = {}  # network -> (ov.Model with a dynamic batch, Contract, graph path, bytes on disk)
        self.requests: dict = {}  # (network, input shapes) -> infer request, least recently used first

    def _model(self, network: str):
        """The network's graph as read (batch dimension dynamic) and its contract, checked once."""
        if network not in self.models:
            entry = self.entry(network)
            verify_files(self.dir, entry, network, self.fix + " --force")
            path = self.dir / next(f for f in entry["files"] if f.endswith(".onnx"))
            try:
                model = self._read(path)
            except RuntimeError as e:
                raise ExportError(f"{path}: OpenVINO can't read it ({str(e).splitlines()[0][:200]}); re-export: "
                                  f"{self.fix} --force") from None
            contract = Contract.from_manifest(network, entry)
            # a port can carry several tensor names (an output that is also an inner node's result): each of the
            # contract's names must name one port, and the port counts must match
            ports = [p.get_names() for p in list(model.inputs) + list(model.outputs)]
            wanted = [t.name for t in contract.inputs + contract.outputs]
            if len(ports) != len(wanted) or not all(any(w in names for names in ports) for w in wanted):
                raise ExportError(f"{path}: the graph's inputs/outputs are not those of {network}; the file was "
                                  f"replaced; re-export: {self.fix} --force")
            size = sum(r["size"] for r in entry["files"].values())  # the graph and any external weights
            self.models[network] = (model, contract, path, size)
        return self.models[network]

    def _request(self, network: str, shapes: dict[str, tuple[int, ...]]):
        """An infer request compiled for these exact input shapes. OpenVINO's kernels for a static shape are
        chosen and its buffers laid out once, at compile time: on the demo's networks in bf16, 8% (sr1024) to 20%
        (decoder) less time per call than the same graph compiled with a dynamic batch. Each compiled shape holds
        its own copy of the weights (the demo's decoder: about 50 MB per shape in bf16), so each network keeps its
        SHAPES_KEPT most recent shapes (a server sees a few batch sizes), and a graph over STATIC_MAX_BYTES (a
        Karlo-sized network, where a copy costs gigabytes and the per-call overhead matters least) is compiled
        once, with its batch dynamic."""
        model, _, path, size = self._model(network)
        static = size <= STATIC_MAX_BYTES
        key = (network, tuple(sorted(shapes.items())) if static else None)
        request = self.requests.pop(key, None)  # re-inserted last: the dict's order is least recently used first
        if request is None:
            try:
                if static:
                    model = model.clone()
                    model.reshape({name: list(shape) for name, shape in shapes.items()})
                request = self.core.compile_model(model, "CPU", self.compile_config(network)).create_infer_request()
            except RuntimeError as e:
                raise ExportError(f"{path}: OpenVINO can't compile it for inputs {dict(shapes)} "
                                  f"({str(e).splitlines()[0][:200]}); re-export: {self.fix} --force") from None
            same = [k for k in self.requests if k[0] == network]
            for k in same[:max(0, len(same) - SHAPES_KEPT + 1)]:
                del self.requests[k]
        self.requests[key] = request
        return request

    def compile_config(self, network: str) -> dict:
        return {**self.config, "INFERENCE_PRECISION_HINT": HINTS[network_precision(network, self.precision)]}

    def _read(self, path: Path):
        """The graph as OpenVINO compiles it: with the export's two-stage GroupNorm means merged (fuse_group_norms),
        which OpenVINO then runs as single MVN kernels; the file itself is not changed."""
        import onnx
        model = onnx.load(str(path), load_external_data=False)
        external = any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)
        if external or not fuse_group_norms(model):  # a graph over 2 GB can't travel as one protobuf: as written
            return self.core.read_model(str(path))
        return self.core.read_model(model.SerializeToString())

    def run(self, network: str, feed: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        contract = self._model(network)[1]
        inputs = {t.name: feed[t.name].detach().cpu().numpy().astype(_NP[t.dtype], copy=False)
                  for t in contract.inputs}
        request = self._request(network, {name: a.shape for name, a in inputs.items()})
        try:
            request.infer(inputs)
        except RuntimeError as e:
            raise failed(self.name, network, e) from None
        return {t.name: torch.from_numpy(request.get_tensor(t.name).data) for t in contract.outputs}
