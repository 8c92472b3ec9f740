"""The `tensorrt` backend: engines from `unclip-export --trt`, preallocated device buffers, execute_async_v3.
Returned tensors are the engine's own buffers: copy what must survive the next call."""
from __future__ import annotations

from pathlib import Path

import torch

from unclip.engine.backend_ort import BackendUnavailable
from unclip.engine.spec import ModelSpec
from unclip.export.artifacts import ExportError, read_manifest, verify_files


class TensorRTBackend:  # pragma: no cover - needs TensorRT and a GPU
    name = "tensorrt"

    def __init__(self, export_dir: str | Path, device: str = "cuda", fix: str = "unclip-export --trt"):
        try:
            import tensorrt as trt
        except ImportError:
            raise BackendUnavailable("the tensorrt backend needs TensorRT 10: pip install tensorrt "
                                     "(on a machine with an NVIDIA GPU)") from None
        if not torch.cuda.is_available():
            raise BackendUnavailable("the tensorrt backend needs an NVIDIA GPU, and torch sees none here")
        self.trt = trt
        self.dir = Path(export_dir)
        self.fix = fix
        self.manifest = read_manifest(self.dir, fix)
        self.spec = ModelSpec.from_json(self.manifest["spec"])
        self.device = torch.device(device if device.startswith("cuda") else "cuda")
        self.dtype = torch.float32
        self.stream = torch.cuda.Stream(self.device)
        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engines: dict = {}

    def max_batch(self, network: str) -> int:
        return self.manifest["networks"][network]["profile"][2]

    def _load(self, network: str):
        if network not in self.engines:
            entry = self.manifest["networks"].get(network)
            if entry is None or "trt" not in entry:
                raise ExportError(f"{self.dir}: no TensorRT engine for {network}; run: {self.fix}")
            rec = entry["trt"]["file"]
            verify_files(self.dir, {"files": {rec["name"]: rec}}, network, self.fix)
            engine = self.runtime.deserialize_cuda_engine((self.dir / rec["name"]).read_bytes())
            ctx = engine.create_execution_context()
            hi = entry["profile"][2]
            buffers = {name: torch.empty([hi if d == "B" else d for d in shape], device=self.device,
                                         dtype=torch.int64 if dt == "int64" else torch.float32)
                       for name, shape, dt in entry["inputs"] + entry["outputs"]}
            self.engines[network] = (ctx, entry, buffers)
        return self.engines[network]

    def run(self, network: str, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        ctx, entry, buffers = self._load(network)
        B = next(iter(inputs.values())).shape[0]
        for name, shape, _ in entry["inputs"]:
            view = buffers[name][:B]
            view.copy_(inputs[name])
            ctx.set_input_shape(name, tuple(view.shape))
            ctx.set_tensor_address(name, view.data_ptr())
        outs = {}
        for name, shape, _ in entry["outputs"]:
            view = buffers[name][:B]
            ctx.set_tensor_address(name, view.data_ptr())
            outs[name] = view
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        ctx.execute_async_v3(self.stream.cuda_stream)
        torch.cuda.current_stream(self.device).wait_stream(self.stream)
        return outs
