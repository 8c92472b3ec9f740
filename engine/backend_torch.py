"""The `torch` backend: the reference networks of unclip.models, on CPU or CUDA, in fp32, fp16 or bf16."""
from __future__ import annotations

import torch

from unclip.export.contract import contracts
from unclip.engine.spec import spec_from_model

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
CONV_NETS = ("decoder", "sr256_first", "sr256_last", "sr1024")  # U-Nets: NHWC convs are 1.1-1.5x faster on CPU


class TorchBackend:
    name = "torch"

    def __init__(self, model, device: str | torch.device = "cpu", precision: str = "fp32", max_batch: int = 64,
                 channels_last: bool = True):
        self.device = torch.device(device)
        self.dtype = DTYPES[precision]
        self.model = model.to(self.device, self.dtype).eval()
        self.spec = spec_from_model(model)
        self.contracts = contracts(self.spec, max_batch)
        self.nets = model.networks()
        self.conv_nets = CONV_NETS if channels_last else ()
        for name in self.conv_nets:
            if name in self.nets:
                self.nets[name].to(memory_format=torch.channels_last)

    def max_batch(self, network: str) -> int:
        return self.contracts[network].profile[2]

    @torch.inference_mode()
    def run(self, network: str, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        c = self.contracts[network]
        args = [inputs[t.name] for t in c.inputs]
        if network in self.conv_nets:
            args = [a.contiguous(memory_format=torch.channels_last) if a.dim() == 4 else a for a in args]
        outs = self.nets[network](*args)
        outs = outs if isinstance(outs, tuple) else (outs,)
        return {t.name: o for t, o in zip(c.outputs, outs)}
