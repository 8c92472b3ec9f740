"""The `onnxruntime` backend: the graphs of an `unclip-export` folder. On CPU, tensors go through numpy; with
onnxruntime-gpu, the CUDA execution provider, one I/O binding per network and static output buffers per
(network, batch) keep tensors on the device. Outputs are valid until the next call of the same network."""
from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import torch
from unclip.core import values
from unclip.core.artifacts import read_manifest, verify_files
from unclip.core.contract import Contract
from unclip.core.errors import BackendUnavailable, ExportError
from unclip.core.packages import require_onnxruntime
from unclip.core.spec import ModelSpec
from unclip.engine.backend import ExportedGraphs, check_device, failed

_NP = {"float32": np.float32, "int64": np.int64}
_TORCH = {"float32": torch.float32, "int64": torch.int64}


class OnnxRuntimeBackend(ExportedGraphs):
    name = "onnxruntime"

    def __init__(self, export_dir: str | Path, device: str = "cpu", fix: str | None = None,
                 threads: int | None = None):
        device = check_device(str(device))
        export_dir = values.path("engines", export_dir)
        self.ort = require_onnxruntime()
        self.threads = threads  # intra-op threads per session on the CPU; None: onnxruntime's default (the cores)
        self.dir = Path(export_dir)
        manifest = read_manifest(self.dir, fix or f"unclip-export --model MODEL --out {self.dir}")
        self.fix = fix or f"unclip-export --model {manifest.get('source') or 'MODEL'} --out {self.dir}"
        self.manifest = manifest
        try:
            self.spec = ModelSpec.from_json(manifest["spec"])
        except (KeyError, TypeError, ValueError) as e:
            raise ExportError(f"{self.dir / 'manifest.json'}: its model description is unreadable ({e}); "
                              f"re-export: {self.fix} --force") from None
        self.device = torch.device(device)
        if self.device.type == "cuda":
            avail = self.ort.get_available_providers()
            if "CUDAExecutionProvider" not in avail:
                raise BackendUnavailable("onnxruntime has no CUDA provider here (available: " + ", ".join(avail) +
                                         "); install onnxruntime-gpu in a clean environment")
            self.providers = [("CUDAExecutionProvider", {"device_id": self.device.index or 0}), "CPUExecutionProvider"]
        else:
            self.providers = ["CPUExecutionProvider"]
        self.sessions: dict = {}
        self.outputs: dict = {}
        self.opening = threading.Lock()

    def session(self, network: str):
        if network not in self.sessions:
            with self.opening:  # lanes run one backend from several threads: each session is made once
                if network not in self.sessions:
                    self._open(network)
        return self.sessions[network]

    def _open(self, network: str) -> None:
        entry = self.entry(network)
        verify_files(self.dir, entry, network, self.fix + " --force")
        opts = self.ort.SessionOptions()
        opts.graph_optimization_level = self.ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3
        if self.device.type == "cpu":
            # idle pool threads sleep instead of spinning: between network calls the sampler's torch ops (and
            # other processes) need those cores (measured on 2 cores: 4.7-4.9 s per demo image, 5.5-6.4 spinning)
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
            if self.threads:
                opts.intra_op_num_threads = self.threads
        path = self.dir / next(f for f in entry["files"] if f.endswith(".onnx"))
        try:
            sess = self.ort.InferenceSession(str(path), opts, providers=self.providers)
        except Exception as e:  # onnxruntime's errors have no common type; all mean a bad file here
            raise ExportError(f"{path}: onnxruntime can't load it ({str(e).splitlines()[0][:200]}); re-export: "
                              f"{self.fix} --force") from None
        got = sess.get_providers()
        if self.device.type == "cuda" and "CUDAExecutionProvider" not in got:
            # onnxruntime-gpu falls back to CPU silently when CUDA libraries are missing
            raise BackendUnavailable(f"onnxruntime fell back to {got} for {network}: the CUDA libraries that "
                                     "onnxruntime-gpu needs are missing")
        contract = Contract.from_manifest(network, entry)
        names = {i.name for i in sess.get_inputs()} | {o.name for o in sess.get_outputs()}
        wanted = {t.name for t in contract.inputs + contract.outputs}
        if names != wanted:
            raise ExportError(f"{path}: the graph's inputs/outputs ({', '.join(sorted(names))}) are not those of "
                              f"{network}; the file was replaced; re-export: {self.fix} --force")
        binding = sess.io_binding() if self.device.type == "cuda" else None
        self.sessions[network] = (sess, contract, binding)

    def run(self, network: str, feed: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        sess, contract, binding = self.session(network)
        if binding is not None:
            return self._run_bound(network, sess, contract, binding, feed)
        inputs = {t.name: feed[t.name].detach().cpu().numpy().astype(_NP[t.dtype], copy=False)
                  for t in contract.inputs}
        try:
            outs = sess.run([t.name for t in contract.outputs], inputs)
        except Exception as e:  # onnxruntime's run-time failures (memory, a provider's error) have no common type
            raise failed(self.name, network, e) from None
        return {t.name: torch.from_numpy(v) for t, v in zip(contract.outputs, outs)}

    def _run_bound(self, network: str, sess, contract: Contract, binding, feed):
        """I/O binding on CUDA: inputs and outputs stay in torch memory on the device; one binding per network."""
        dev = self.device.index or 0
        keep = []
        for t in contract.inputs:
            x = feed[t.name].to(self.device, _TORCH[t.dtype]).contiguous()
            keep.append(x)
            binding.bind_input(t.name, "cuda", dev, _NP[t.dtype], tuple(x.shape), x.data_ptr())
        B = feed[contract.inputs[0].name].shape[0]
        if (network, B) not in self.outputs:  # static output buffers per (network, batch)
            self.outputs[(network, B)] = {t.name: torch.empty(t.concrete(B), device=self.device, dtype=torch.float32)
                                          for t in contract.outputs}
        outs = self.outputs[(network, B)]
        for t in contract.outputs:
            o = outs[t.name]
            binding.bind_output(t.name, "cuda", dev, np.float32, tuple(o.shape), o.data_ptr())
        try:
            sess.run_with_iobinding(binding)
        except Exception as e:
            raise failed(self.name, network, e) from None
        return outs
