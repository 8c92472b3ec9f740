"""The `torch` backend: the reference networks of unclip.models, on CPU or CUDA, in fp32, fp16 or bf16 (bf16 keeps
the networks that make the CLIP embeddings fp32: core.stages.FP32_IN_BF16). It takes fp32 tensors and returns fp32
tensors whatever precision it computes in."""
from __future__ import annotations

import copy

import torch
from unclip.core import values
from unclip.core.contract import contracts
from unclip.core.errors import RequestError
from unclip.core.spec import spec_from_model
from unclip.core.stages import IMAGE_STAGES, STAGES, network_precision
from unclip.engine.backend import check_device, failed
from unclip.engine.static import StaticNetwork

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
CONV_NETS = tuple(n for s in IMAGE_STAGES for n in STAGES[s].networks)  # U-Nets: NHWC convs are 1.1-1.5x on CPU


MODES = ("eager", "static", "cuda-graphs", "compile")


class TorchBackend:
    """mode: eager (the networks called as they are); static (static input/output buffers per network and batch,
    constant inputs copied once per stage: engine/static.py); cuda-graphs (static, each network call a replayed
    CUDA graph; CUDA only); compile (torch.compile, Inductor: fuses normalisations and activations, CPU or CUDA)."""
    name = "torch"

    def __init__(self, model, device: str | torch.device = "cpu", precision: str = "fp32", max_batch: int = 64,
                 channels_last: bool = True, copy: bool = True, mode: str = "eager"):
        """With copy=False the backend converts `model`'s networks in place (to the device, dtype and memory
        format) instead of converting copies: for callers that hand the model over."""
        if not callable(getattr(model, "networks", None)):
            raise RequestError(f"TorchBackend takes a loaded model (unclip.models.load_model(folder) or "
                               f"build_preset('demo')), got {model!r} ({type(model).__name__})")
        if mode not in MODES:
            raise RequestError(f"--torch-mode {mode!r} is not one of {', '.join(MODES)}")
        if precision not in DTYPES:
            raise RequestError(f"--precision {precision!r} is not available with --backend torch (choose "
                               f"{', '.join(DTYPES)})")
        if values.whole("max_batch", max_batch) < 1:
            raise RequestError(f"--max-batch must be at least 1, got {max_batch}")
        self.spec = spec_from_model(model)  # read before any conversion: the statistics stay fp32
        self.device = check_device(device) if isinstance(device, str) else torch.device(device)
        self.dtype = DTYPES[precision]  # of the U-Nets; bf16 keeps the embedding networks fp32 (network_precision)
        self.contracts = contracts(self.spec, max_batch)
        self.mode, self.channels_last = mode, channels_last
        self.nets = {}
        for name, net in model.networks().items():
            dtype = DTYPES[network_precision(name, precision)]
            net = (copy_module(net) if copy else net).to(self.device, dtype).eval().requires_grad_(False)
            if channels_last and name in CONV_NETS:
                net = net.to(memory_format=torch.channels_last)
            self.nets[name] = torch.compile(net, dynamic=False) if mode == "compile" else net
        self.statics: dict[tuple[str, int], StaticNetwork] = {}

    def max_batch(self, network: str) -> int:
        return self.contracts[network].profile[2]

    def _call(self, network: str, *args: torch.Tensor):
        if self.channels_last and network in CONV_NETS:
            args = [a.contiguous(memory_format=torch.channels_last) if a.dim() == 4 else a for a in args]
        return self.nets[network](*args)  # the networks cast to their own dtype

    @torch.inference_mode()
    def run(self, network: str, feed: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        c = self.contracts[network]
        try:
            if self.mode in ("static", "cuda-graphs"):
                key = (network, feed[c.inputs[0].name].shape[0])
                if key not in self.statics:
                    self.statics[key] = StaticNetwork(lambda *a: self._call(network, *a), c, key[1], self.device,
                                                      capture=self.mode == "cuda-graphs")
                return self.statics[key].run(feed)
            outs = self._call(network, *[feed[t.name].to(self.device) for t in c.inputs])
        except (MemoryError, torch.cuda.OutOfMemoryError) as e:  # a resource, not a bug: other errors stay tracebacks
            raise failed(self.name, network, e) from None
        outs = outs if isinstance(outs, tuple) else (outs,)
        return {t.name: o.float() for t, o in zip(c.outputs, outs)}


def native_bf16() -> bool:
    """Whether this CPU computes bf16 in hardware (AVX512-BF16 or AMX); without, torch emulates bf16 matmuls and
    convolutions many times slower than fp32 (an AVX2 CPU, measured 2026-11-26: a 1024x1024 matmul 2.9 s in bf16)."""
    cpu = torch.cpu
    return any(getattr(cpu, f, lambda: False)() for f in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))


def copy_module(net: torch.nn.Module) -> torch.nn.Module:
    return copy.deepcopy(net)
