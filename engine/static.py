"""Static buffers for the GPU fast path (gpt-fast / TensorRT style): each (network, batch) owns preallocated input
and output tensors; an input is copied in only when the caller passes a different tensor or changed it in place,
so a stage's constant inputs (text_proj's conditioning, the upsampled low-res image, the text) are copied once per
stage and only x_t and t every step. On CUDA the network call is captured once per (network, batch) into a CUDA
graph and replayed; on the CPU the same code runs eagerly, so CPU tests cover the buffer and binding logic."""
from __future__ import annotations

from typing import Callable

import torch
from unclip.core.contract import Contract


class Binder:
    """Copies feed tensors into fixed destination tensors, skipping those that are the very tensor copied last time
    and unchanged since (same object, same in-place version counter). It keeps a reference to each source, so a
    freed tensor's memory can't come back under a new tensor at the same address and fool the check."""

    def __init__(self):
        self.sources: dict[str, tuple[torch.Tensor, int]] = {}
        self.copies = 0  # how many tensors were copied in (tests read it)

    def bind(self, name: str, src: torch.Tensor, dst: torch.Tensor) -> None:
        seen = self.sources.get(name)
        if seen is not None and seen[0] is src and seen[1] == src._version:
            return
        dst.copy_(src)
        self.sources[name] = (src, src._version)
        self.copies += 1


class StaticNetwork:
    """One network at one batch on static buffers, optionally as a captured CUDA graph."""

    def __init__(self, net: Callable, contract: Contract, batch: int, device: torch.device, capture: bool):
        self.net, self.contract = net, contract
        self.inputs = {t.name: torch.zeros(t.concrete(batch), device=device,
                                           dtype=torch.int64 if t.dtype == "int64" else torch.float32)
                       for t in contract.inputs}
        self.binder = Binder()
        self.graph = None
        self.outputs = self._call()  # allocates the static outputs (and warms up before a capture)
        if capture:
            self.graph = torch.cuda.CUDAGraph()
            stream = torch.cuda.Stream(device)
            stream.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(stream):
                self._call()  # warm-up on the side stream, as capture requires
            torch.cuda.current_stream(device).wait_stream(stream)
            with torch.cuda.graph(self.graph):
                self.outputs = self._call()

    def _call(self) -> dict[str, torch.Tensor]:
        outs = self.net(*[self.inputs[t.name] for t in self.contract.inputs])
        outs = outs if isinstance(outs, tuple) else (outs,)
        return {t.name: o.float() for t, o in zip(self.contract.outputs, outs)}

    def run(self, feed: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        for t in self.contract.inputs:
            self.binder.bind(t.name, feed[t.name], self.inputs[t.name])
        if self.graph is not None:
            self.graph.replay()
            return self.outputs
        out = self._call()
        for k, v in out.items():  # the same static output tensors every call, like a graph's
            self.outputs[k].copy_(v)
        return self.outputs
