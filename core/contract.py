"""One export contract per network: input/output names, dtypes, shapes with the dynamic batch axis, the
min/opt/max batch profile and seeded sample inputs. Export, engine build, runtime, tests and benchmarks read it;
the manifest of an export stores it (to_manifest) and the runtime reads it back (from_manifest)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from unclip.core.spec import ModelSpec
from unclip.core.stages import NETWORK_STAGE, can_guide

B = "B"  # the dynamic batch axis


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple  # ints, and B for the batch axis
    dtype: str = "float32"

    def concrete(self, batch: int) -> tuple[int, ...]:
        return tuple(batch if d == B else d for d in self.shape)


@dataclass(frozen=True)
class Contract:
    network: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    max_batch: int  # images per call; guided networks take twice this

    @property
    def profile(self) -> tuple[int, int, int]:
        """(min, opt, max) batch for the optimisation profile (guided stages run [uncond; cond] at 2N)."""
        k = 2 if can_guide(NETWORK_STAGE[self.network]) else 1
        return 1, k, k * self.max_batch

    def to_manifest(self) -> dict:
        return {"inputs": [[t.name, list(t.shape), t.dtype] for t in self.inputs],
                "outputs": [[t.name, list(t.shape), t.dtype] for t in self.outputs], "max_batch": self.max_batch}

    @classmethod
    def from_manifest(cls, network: str, entry: dict) -> "Contract":
        def specs(rows):
            return tuple(TensorSpec(n, tuple(shape), dt) for n, shape, dt in rows)
        max_batch = entry.get("max_batch") or entry["profile"][2] // (2 if can_guide(NETWORK_STAGE[network]) else 1)
        return cls(network, specs(entry["inputs"]), specs(entry["outputs"]), max_batch)

    def sample_inputs(self, batch: int, spec: ModelSpec, seed: int = 0) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        out = {}
        for ts in self.inputs:
            shape = ts.concrete(batch)
            if ts.name == "input_ids":
                ids = torch.randint(0, spec.vocab_size - 2, shape, generator=g)
                for i in range(batch):
                    n = 3 + (7 * i) % (spec.text_len - 3)
                    ids[i, 0], ids[i, n] = spec.vocab_size - 2, spec.vocab_size - 1  # BOS ... EOS
                out[ts.name] = ids
            elif ts.name in ("text_mask", "context_mask"):
                m = torch.ones(shape)
                for i in range(batch):
                    m[i, shape[1] - 1 - (5 * i) % (shape[1] // 2):] = 0
                out[ts.name] = m
            elif ts.name == "cond":
                out[ts.name] = (torch.arange(batch) % 2).float()
            elif ts.name == "t":
                out[ts.name] = torch.randint(0, 1000, shape, generator=g).float()
            else:
                out[ts.name] = torch.randn(shape, generator=g)
        return out


def contracts(spec: ModelSpec, max_batch: int = 4) -> dict[str, Contract]:
    T, W, D = spec.text_len, spec.text_width, spec.embed_dim
    L = spec.extra_tokens + T
    S, S2 = spec.decoder_size, spec.sr256_size

    def sr(name: str, size: int) -> Contract:
        return Contract(name, (TensorSpec("x_t", (B, 3, size, size)), TensorSpec("t", (B,)),
                               TensorSpec("low_res", (B, 3, size, size))),
                        (TensorSpec("eps", (B, 3, size, size)),), max_batch)

    c = {
        "text_encoder": Contract("text_encoder", (TensorSpec("input_ids", (B, T), "int64"),),
                                 (TensorSpec("text_embeds", (B, D)), TensorSpec("text_hidden", (B, T, W))), max_batch),
        "prior": Contract("prior", (TensorSpec("x_t", (B, D)), TensorSpec("t", (B,)), TensorSpec("text_embeds", (B, D)),
                                    TensorSpec("text_hidden", (B, T, W)), TensorSpec("text_mask", (B, T))),
                          (TensorSpec("x0", (B, D)),), max_batch),
        "text_proj": Contract("text_proj", (TensorSpec("image_embeds", (B, D)), TensorSpec("cond", (B,)),
                                            TensorSpec("text_embeds", (B, D)), TensorSpec("text_hidden", (B, T, W)),
                                            TensorSpec("text_mask", (B, T))),
                              (TensorSpec("class_emb", (B, spec.time_embed_dim)),
                               TensorSpec("context", (B, L, spec.context_dim)), TensorSpec("context_mask", (B, L))),
                              max_batch),
        "decoder": Contract("decoder", (TensorSpec("x_t", (B, 3, S, S)), TensorSpec("t", (B,)),
                                        TensorSpec("class_emb", (B, spec.time_embed_dim)),
                                        TensorSpec("context", (B, L, spec.context_dim)),
                                        TensorSpec("context_mask", (B, L))),
                            (TensorSpec("out", (B, spec.decoder_out_channels, S, S)),), max_batch),
        "sr256_first": sr("sr256_first", S2),
        "sr256_last": sr("sr256_last", S2),
    }
    if spec.sr1024_size is not None:
        c["sr1024"] = sr("sr1024", spec.sr1024_size)
    if spec.image_size is not None:
        c["image_encoder"] = Contract("image_encoder", (TensorSpec("pixel_values", (B, 3, spec.image_size, spec.image_size)),),
                                      (TensorSpec("image_embeds", (B, D)),), max_batch)
    return c
