"""The `onnxruntime` backend: the graphs of an `unclip-export` directory. On CPU, tensors go through numpy; with
onnxruntime-gpu, CUDA (or TensorRT) execution providers and I/O binding keep step tensors on the device."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from unclip.engine.spec import ModelSpec
from unclip.export.artifacts import ExportError, read_manifest, verify_files

log = logging.getLogger(__name__)

_NP = {"float32": np.float32, "int64": np.int64, "float16": np.float16}


class BackendUnavailable(Exception):
    """The backend's package or device is missing; the message names what to install."""


class OnnxRuntimeBackend:
    name = "onnxruntime"

    def __init__(self, export_dir: str | Path, device: str = "cpu", fix: str | None = None, threads: int = 0,
                 tensorrt_ep: bool = False):
        try:
            import onnxruntime as ort
        except ImportError:
            raise BackendUnavailable("the onnxruntime backend needs the onnxruntime package: "
                                     "pip install onnxruntime (or onnxruntime-gpu for CUDA, never both)") from None
        self.ort = ort
        ort.set_default_logger_severity(3)
        self.dir = Path(export_dir)
        self.fix = fix or f"unclip-export --model MODEL --out {self.dir} --force"
        self.manifest = read_manifest(self.dir, self.fix)
        if fix is None and self.manifest.get("source"):
            self.fix = f"unclip-export --model {self.manifest['source']} --out {self.dir} --force"
        self.spec = ModelSpec.from_json(self.manifest["spec"])
        self.device = torch.device(device)
        self.dtype = torch.float32  # graphs take float32 I/O whatever their compute precision
        if self.device.type == "cuda":
            avail = ort.get_available_providers()
            if "CUDAExecutionProvider" not in avail:
                raise BackendUnavailable("onnxruntime has no CUDA provider here (available: " + ", ".join(avail) +
                                         "); install onnxruntime-gpu in a clean environment")
            self.providers = [("CUDAExecutionProvider", {"device_id": self.device.index or 0}), "CPUExecutionProvider"]
            if tensorrt_ep:
                if "TensorrtExecutionProvider" not in avail:
                    raise BackendUnavailable("onnxruntime has no TensorRT execution provider here; install TensorRT "
                                             "next to onnxruntime-gpu, or drop tensorrt_ep")
                self.providers.insert(0, ("TensorrtExecutionProvider", {"device_id": self.device.index or 0,
                                                                        "trt_fp16_enable": True,
                                                                        "trt_engine_cache_enable": True,
                                                                        "trt_engine_cache_path": str(self.dir)}))
        else:
            self.providers = ["CPUExecutionProvider"]
        self.threads = threads
        self.sessions: dict = {}

    def max_batch(self, network: str) -> int:
        return self.manifest["networks"][network]["profile"][2]

    def has(self, network: str) -> bool:
        return network in self.manifest["networks"]

    def session(self, network: str):
        if network not in self.sessions:
            entry = self.manifest["networks"].get(network)
            if entry is None:
                raise ExportError(f"{self.dir}: no {network} graph in this export; run: {self.fix}")
            verify_files(self.dir, entry, network, self.fix)
            opts = self.ort.SessionOptions()
            opts.graph_optimization_level = self.ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            opts.log_severity_level = 3
            if self.threads:
                opts.intra_op_num_threads = self.threads
            path = self.dir / next(f for f in entry["files"] if f.endswith(".onnx"))
            sess = self.ort.InferenceSession(str(path), opts, providers=self.providers)
            got = sess.get_providers()
            if self.device.type == "cuda" and "CUDAExecutionProvider" not in got:
                # onnxruntime-gpu falls back to CPU silently when CUDA libraries are missing
                raise BackendUnavailable(f"onnxruntime fell back to {got} for {network}: the CUDA libraries that "
                                         "onnxruntime-gpu needs are missing")
            self.sessions[network] = (sess, entry)
        return self.sessions[network]

    def run(self, network: str, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        sess, entry = self.session(network)
        if self.device.type == "cuda":
            return self._run_bound(sess, entry, inputs)
        feed = {name: inputs[name].detach().cpu().numpy().astype(_NP[dt], copy=False) for name, _, dt in entry["inputs"]}
        outs = sess.run([o[0] for o in entry["outputs"]], feed)
        return {o[0]: torch.from_numpy(v) for o, v in zip(entry["outputs"], outs)}

    def _run_bound(self, sess, entry, inputs):
        """I/O binding: inputs and outputs stay in torch CUDA memory; no host copies per step."""
        binding = sess.io_binding()
        dev = self.device.index or 0
        keep = []
        for name, _, dt in entry["inputs"]:
            t = inputs[name].contiguous()
            t = t.to(torch.int64 if dt == "int64" else torch.float32)
            keep.append(t)
            binding.bind_input(name, "cuda", dev, _NP[dt], tuple(t.shape), t.data_ptr())
        B = next(iter(inputs.values())).shape[0]
        outs = {}
        for name, shape, _ in entry["outputs"]:
            o = torch.empty([B if d == "B" else d for d in shape], device=self.device, dtype=torch.float32)
            outs[name] = o
            binding.bind_output(name, "cuda", dev, np.float32, tuple(o.shape), o.data_ptr())
        sess.run_with_iobinding(binding)
        return outs
