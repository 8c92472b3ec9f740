"""Read and write unCLIP model folders in the diffusers layout (Karlo's `kakaobrain/karlo-v1-alpha`), with no
diffusers or transformers installed.

Networks are built on the meta device and the checkpoint tensors are assigned in place, so a 4 GB prior is held
in memory once. Every problem a user can cause (wrong folder, missing or corrupt file, a different architecture)
raises ModelLoadError with one line naming the path and the fix.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from unclip.core.artifacts import default_mode
from unclip.core.identity import GENERATION_CONFIG
from unclip.core.tokenizer import CLIPTokenizer
from unclip.models.clip import TRANSFORMERS_METADATA
from unclip.models.common import ModelLoadError, config_from_dict, config_to_dict
from unclip.models.decoder import Decoder, DecoderConfig
from unclip.models.image_encoder import ImageEncoder, ImageEncoderConfig
from unclip.models.prior import Prior, PriorConfig
from unclip.models.superres import SuperRes, SuperResConfig
from unclip.models.text_encoder import TextEncoder, TextEncoderConfig
from unclip.models.text_proj import TextProj, TextProjConfig

DIFFUSERS_VERSION = "0.30.0"  # written into saved configs; any diffusers >= 0.12 reads them
README_HINT = "see README.md, 'Real Karlo weights'"


@dataclass(frozen=True)
class SchedulerConfig:
    """The training noise schedule and sampling conventions of one stage (scheduler_config.json)."""
    num_train_timesteps: int = 1000
    beta_schedule: str = "squaredcos_cap_v2"
    beta_start: float = 0.0001
    beta_end: float = 0.02
    prediction_type: str = "epsilon"  # or "sample" (the prior predicts x0)
    variance_type: str = "fixed_small_log"  # or "learned_range" (the decoder's 3 extra channels)
    clip_sample: bool = True
    clip_sample_range: float = 1.0

    def __post_init__(self):
        if self.beta_schedule not in ("squaredcos_cap_v2", "linear"):
            raise ValueError(f"beta_schedule={self.beta_schedule!r} is not supported (supported: 'squaredcos_cap_v2', 'linear')")
        if self.prediction_type not in ("epsilon", "sample"):
            raise ValueError(f"prediction_type={self.prediction_type!r} is not supported (supported: 'epsilon', 'sample')")
        if self.variance_type not in ("fixed_small_log", "learned_range"):
            raise ValueError(f"variance_type={self.variance_type!r} is not supported "
                             "(supported: 'fixed_small_log', 'learned_range')")
        if not isinstance(self.num_train_timesteps, int) or self.num_train_timesteps < 2:
            raise ValueError(f"num_train_timesteps={self.num_train_timesteps!r} must be a whole number >= 2")
        if not 0 < self.beta_start < 1 or not 0 < self.beta_end < 1:
            raise ValueError(f"beta_start={self.beta_start!r} and beta_end={self.beta_end!r} must be in (0, 1)")
        if not self.clip_sample_range > 0:
            raise ValueError(f"clip_sample_range={self.clip_sample_range!r} must be > 0")


KARLO_SCHEDULERS = {
    "prior": SchedulerConfig(prediction_type="sample", clip_sample_range=5.0),
    "decoder": SchedulerConfig(variance_type="learned_range"),
    "sr256": SchedulerConfig(),
    # The paper's 256->1024 upsampler: linear schedule (Table 3).
    "sr1024": SchedulerConfig(beta_schedule="linear"),
}


@dataclass
class UnCLIPModel:
    """Every network of an unCLIP model, keyed by stage name, with its tokenizer and noise schedules."""
    tokenizer: CLIPTokenizer
    text_encoder: TextEncoder
    prior: Prior
    text_proj: TextProj
    decoder: Decoder
    sr256_first: SuperRes
    sr256_last: SuperRes
    sr1024: SuperRes | None = None
    image_encoder: ImageEncoder | None = None
    schedulers: dict[str, SchedulerConfig] = field(default_factory=lambda: dict(KARLO_SCHEDULERS))
    name: str = "unclip"
    defaults: dict[str, float | int] = field(default_factory=dict)  # generation_config.json: scales, step counts

    def networks(self) -> dict[str, nn.Module]:
        """Stage-named modules that exist in this model (sr256 has two networks: first steps, last step)."""
        nets = {"text_encoder": self.text_encoder, "image_encoder": self.image_encoder, "prior": self.prior,
                "text_proj": self.text_proj, "decoder": self.decoder, "sr256_first": self.sr256_first,
                "sr256_last": self.sr256_last, "sr1024": self.sr1024}
        return {k: v for k, v in nets.items() if v is not None}

    def to(self, *args, **kwargs) -> "UnCLIPModel":
        for net in self.networks().values():
            net.to(*args, **kwargs)
        return self

    def eval(self) -> "UnCLIPModel":
        for net in self.networks().values():
            net.eval().requires_grad_(False)
        return self


# --- components --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Component:
    folder: str  # sub-folder of the model folder
    attr: str  # UnCLIPModel field
    cls: type
    config_cls: type
    class_names: tuple[str, ...]  # accepted _class_name / architectures
    library: str  # "diffusers" (diffusion_pytorch_model.*) or "transformers" (model.* / pytorch_model.*)
    required: bool = True
    fixed: dict = dataclasses.field(default_factory=dict)
    ignored: frozenset = frozenset()
    strict: bool = True


_UNET_COMMON_FIXED = {
    "center_input_sample": (False,), "downsample_padding": (1,), "mid_block_scale_factor": (1, 1.0),
    "dropout": (0.0, 0), "act_fn": ("silu",), "time_embedding_type": ("positional",),
    "time_embedding_dim": (None,), "class_embeddings_concat": (False,), "num_class_embeds": (None,),
}
_DECODER_FIXED = {
    **_UNET_COMMON_FIXED, "only_cross_attention": (False,), "transformer_layers_per_block": (1,),
    "reverse_transformer_layers_per_block": (None,), "encoder_hid_dim": (None,), "encoder_hid_dim_type": (None,),
    "num_attention_heads": (None,), "dual_cross_attention": (False,), "use_linear_projection": (False,),
    "addition_embed_type": (None,), "addition_time_embed_dim": (None,), "upcast_attention": (False,),
    "resnet_skip_time_act": (False,), "resnet_out_scale_factor": (1.0, 1), "time_embedding_act_fn": (None,),
    "timestep_post_act": (None,), "time_cond_proj_dim": (None,), "conv_in_kernel": (3,), "conv_out_kernel": (3,),
    "projection_class_embeddings_input_dim": (None,), "attention_type": ("default",),
    "mid_block_only_cross_attention": (None, False), "cross_attention_norm": (None,),
}
_SR_FIXED = {**_UNET_COMMON_FIXED, "mid_block_type": ("UNetMidBlock2D",), "class_embed_type": (None,),
             "num_train_timesteps": (None,)}
_SR_IGNORED = frozenset({"attention_head_dim", "attn_norm_num_groups", "downsample_type", "upsample_type"})
_SR = dict(cls=SuperRes, config_cls=SuperResConfig, class_names=("UNet2DModel",), library="diffusers",
           fixed=_SR_FIXED, ignored=_SR_IGNORED)

COMPONENTS = [
    Component("text_encoder", "text_encoder", TextEncoder, TextEncoderConfig, ("CLIPTextModelWithProjection",),
              "transformers", strict=False, ignored=TRANSFORMERS_METADATA),
    Component("prior", "prior", Prior, PriorConfig, ("PriorTransformer",), "diffusers", fixed={
        "norm_in_type": (None,), "embedding_proj_norm_type": (None,), "encoder_hid_proj_type": ("linear",),
        "added_emb_type": ("prd",), "time_embed_dim": (None,), "embedding_proj_dim": (None,),
        "clip_embed_dim": (None,)}),
    Component("text_proj", "text_proj", TextProj, TextProjConfig, ("UnCLIPTextProjModel",), "diffusers"),
    Component("decoder", "decoder", Decoder, DecoderConfig, ("UNet2DConditionModel",), "diffusers",
              fixed=_DECODER_FIXED, ignored=frozenset({"addition_embed_type_num_heads"})),
    Component("super_res_first", "sr256_first", **_SR),
    Component("super_res_last", "sr256_last", **_SR),
    Component("sr1024", "sr1024", required=False, **_SR),
    Component("image_encoder", "image_encoder", ImageEncoder, ImageEncoderConfig, ("CLIPVisionModelWithProjection",),
              "transformers", required=False, strict=False, ignored=TRANSFORMERS_METADATA),
]
SCHEDULER_FOLDERS = {"prior": "prior_scheduler", "decoder": "decoder_scheduler", "sr256": "super_res_scheduler",
                     "sr1024": "sr1024_scheduler"}
_IGNORED_WEIGHTS = re.compile(r"(^|\.)position_ids$")  # a buffer old transformers versions saved


def _weight_files(folder: Path, library: str) -> list[Path]:
    stem = "diffusion_pytorch_model" if library == "diffusers" else "model"
    candidates = [stem + ".safetensors", stem + ".bin" if library == "diffusers" else "pytorch_model.bin"]
    for name in candidates:
        index = folder / (name + ".index.json")
        if index.is_file():
            try:
                shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (ValueError, KeyError) as e:
                raise ModelLoadError(f"{index}: unreadable shard index ({e}); download the file again") from None
            missing = [s for s in shards if not (folder / s).is_file()]
            if missing:
                raise ModelLoadError(f"{folder / missing[0]}: weight shard is missing; download it again")
            return [folder / s for s in shards]
        if (folder / name).is_file():
            return [folder / name]
    raise ModelLoadError(f"{folder}: no weight file (expected {' or '.join(candidates)}); "
                         "download the component's weights into this folder")


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    try:
        open(path, "rb").close()  # safetensors and torch.load report a denied read as "No such file or directory"
        if path.suffix == ".safetensors":
            from safetensors import safe_open
            out = {}
            with safe_open(str(path), framework="pt", device="cpu") as f:
                for key in f.keys():
                    out[key] = f.get_tensor(key)
            return out
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # legacy (non-zip) format can't be memory-mapped
            return torch.load(path, map_location="cpu", weights_only=True)
    except ModelLoadError:
        raise
    except PermissionError:
        raise ModelLoadError(f"{path}: permission denied; ask the folder's owner for read access") from None
    except Exception as e:  # safetensors / pickle errors have many types; all mean the same to a user
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ModelLoadError(f"{path}: cannot read weights ({reason}); the file is truncated or corrupt, "
                             "download it again") from None


def _read_json(path: Path, what: str, fix: str = "restore the file from the model download") -> dict[str, Any]:
    if not path.is_file():
        raise ModelLoadError(f"{path}: {what} is missing; copy the whole model folder")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{path}: not valid JSON ({e}); {fix}") from None
    except PermissionError:
        raise ModelLoadError(f"{path}: permission denied; ask the folder's owner for read access") from None
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path}: expected a JSON object; {fix}")
    return data


def _check_class(raw: dict, comp: Component, path: Path) -> None:
    names = [raw.get("_class_name")] + list(raw.get("architectures") or [])
    names = [n for n in names if n]
    if names and not any(n in comp.class_names for n in names):
        raise ModelLoadError(f"{path}: {comp.folder} is a {names[0]}, expected {' or '.join(comp.class_names)}; "
                             "this folder is not an unCLIP model")


def _load_state(module: nn.Module, state: dict[str, torch.Tensor], folder: Path, dtype: torch.dtype) -> None:
    state = {k: v for k, v in state.items() if not _IGNORED_WEIGHTS.search(k)}
    expected = {k: v.shape for k, v in module.state_dict().items()}
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys ({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys "
                         f"({', '.join(unexpected[:3])}{', ...' if len(unexpected) > 3 else ''})")
        raise ModelLoadError(f"{folder}: weights don't match config.json: {'; '.join(parts)}; "
                             "the weights and config.json come from different models")
    for k, shape in expected.items():
        if tuple(state[k].shape) != tuple(shape):
            raise ModelLoadError(f"{folder}: tensor {k} has shape {tuple(state[k].shape)} but config.json implies "
                                 f"{tuple(shape)}; the weights and config.json come from different models")
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    module.load_state_dict(state, strict=True, assign=True)


def load_component(model_dir: Path, comp: Component, dtype: torch.dtype = torch.float32) -> nn.Module | None:
    folder = model_dir / comp.folder
    if not folder.is_dir():
        if comp.required:
            raise ModelLoadError(f"{folder}: component folder is missing; copy the whole model folder "
                                 f"(an unCLIP folder has prior/, decoder/, text_proj/, super_res_first/, "
                                 "super_res_last/, text_encoder/, tokenizer/)")
        return None
    raw = _read_json(folder / "config.json", "config.json")
    _check_class(raw, comp, folder / "config.json")
    try:
        cfg = config_from_dict(comp.config_cls, raw, str(folder / "config.json"), fixed=comp.fixed,
                               ignored=comp.ignored, strict=comp.strict)
    except ValueError as e:
        raise ModelLoadError(f"{folder / 'config.json'}: {e}") from None
    files = _weight_files(folder, comp.library)
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(_read_weights(f))
    try:
        with torch.device("meta"):
            module = comp.cls(cfg)
    except (ValueError, TypeError, ZeroDivisionError, RuntimeError, AssertionError) as e:
        raise ModelLoadError(f"{folder / 'config.json'}: the config describes no network this engine can build "
                             f"({type(e).__name__}: {e}); restore the file from the model download") from None
    _load_state(module, state, folder, dtype)
    return module.eval().requires_grad_(False)


def load_scheduler(path: Path, default: SchedulerConfig) -> SchedulerConfig:
    if not path.is_file():
        return default
    raw = _read_json(path, "scheduler_config.json")
    try:
        return config_from_dict(SchedulerConfig, raw, str(path), strict=False)
    except ValueError as e:
        raise ModelLoadError(f"{path}: {e}") from None


def load_model(path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> UnCLIPModel:
    """Read a diffusers-format unCLIP folder (e.g. kakaobrain/karlo-v1-alpha) into an UnCLIPModel."""
    root = Path(path)
    if not root.is_dir():
        raise ModelLoadError(f"{root}: no such model folder; pass the folder that holds model_index.json "
                             f"({README_HINT})")
    index = root / "model_index.json"
    if not index.is_file():
        raise ModelLoadError(f"{root}: not an unCLIP model folder (no model_index.json); pass the folder that "
                             f"holds model_index.json, prior/ and decoder/ ({README_HINT})")
    idx = _read_json(index, "model_index.json")
    if "prior" not in idx or "decoder" not in idx:
        kind = idx.get("_class_name", "unknown pipeline")
        raise ModelLoadError(f"{index}: a {kind} folder, not an unCLIP model (no 'prior'/'decoder' entries); "
                             f"use a Karlo / UnCLIPPipeline folder ({README_HINT})")
    tp = idx.get("text_proj")
    if isinstance(tp, list) and len(tp) == 2 and tp[1] != "UnCLIPTextProjModel":
        raise ModelLoadError(f"{index}: text_proj is a {tp[1]}, expected UnCLIPTextProjModel")
    defaults = read_generation_config(root)  # before gigabytes of weights: a typo there is reported at once
    modules = {comp.attr: load_component(root, comp, dtype) for comp in COMPONENTS}
    tokenizer = CLIPTokenizer.from_folder(root / "tokenizer")
    schedulers = {stage: load_scheduler(root / folder / "scheduler_config.json", KARLO_SCHEDULERS[stage])
                  for stage, folder in SCHEDULER_FOLDERS.items()}
    return UnCLIPModel(tokenizer=tokenizer, schedulers=schedulers, name=root.name,
                       defaults=defaults, **modules)


# GENERATION_CONFIG (core.identity): optional, in the model folder's root; diffusers ignores it
GENERATION_SCALES = ("prior_guidance", "decoder_guidance")
GENERATION_STEPS = ("prior_steps", "decoder_steps", "sr256_steps", "sr1024_steps")
GENERATION_KEYS = GENERATION_SCALES + GENERATION_STEPS


def generation_values(raw: dict) -> dict[str, float | int]:
    """The scales (floats) and step counts (ints) of a generation config's dict, keys starting with "_" ignored
    (comments); ValueError naming the first bad key or value."""
    out: dict[str, float | int] = {}
    for k, v in raw.items():
        if k.startswith("_"):
            continue
        if k not in GENERATION_KEYS:
            raise ValueError(f"unknown key {k!r}; it may hold {', '.join(GENERATION_KEYS)}")
        if k in GENERATION_STEPS:
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{k} must be a whole number >= 1, got {v!r}")
            out[k] = v
        elif isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise ValueError(f"{k} must be a finite number >= 0, got {v!r}")
        else:
            out[k] = float(v)
    return out


def read_generation_config(root: Path) -> dict[str, float | int]:
    """The guidance scales and step counts a model folder recommends ({} without the file: the engine uses Karlo's
    4 / 8 and 25 / 25 / 7 / 15)."""
    path = root / GENERATION_CONFIG
    if not path.is_file():
        return {}
    raw = _read_json(path, GENERATION_CONFIG, fix="fix or delete the file (it is this project's, not a download's)")
    try:
        return generation_values(raw)
    except ValueError as e:
        raise ModelLoadError(f"{path}: {e}; fix or delete the file") from None


# --- saving ------------------------------------------------------------------------------------------------

def _save_component(module: nn.Module, comp: Component, folder: Path, dtype: torch.dtype | None = None) -> None:
    from safetensors.torch import save_file
    folder.mkdir(parents=True)
    meta = ({"_class_name": comp.class_names[0], "_diffusers_version": DIFFUSERS_VERSION}
            if comp.library == "diffusers" else {"architectures": [comp.class_names[0]]})
    (folder / "config.json").write_text(json.dumps(config_to_dict(module.config, meta), indent=2))
    state = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).detach().contiguous()
             for k, v in module.state_dict().items()}
    name = "diffusion_pytorch_model.safetensors" if comp.library == "diffusers" else "model.safetensors"
    save_file(state, str(folder / name), metadata={"format": "pt"})
    os.chmod(folder / name, default_mode())  # safetensors creates it 0600: other users could not load the model


def _component(folder: str) -> Component:
    return next(c for c in COMPONENTS if c.folder == folder)


def save_component(module: nn.Module, root: str | os.PathLike, folder: str, dtype: torch.dtype | None = None) -> Path:
    """Write one component folder (e.g. "decoder") of a model folder, replacing it atomically; `dtype` converts
    the floating-point tensors (fp16 for a compact copy)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder}.", dir=root))
    os.chmod(tmp, default_mode(directory=True))
    try:
        _save_component(module, _component(folder), tmp / folder, dtype)
        old = root / folder
        if old.exists():
            shutil.rmtree(old)
        os.replace(tmp / folder, old)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root / folder


def write_pipeline_files(root: Path, tokenizer: CLIPTokenizer, schedulers: dict[str, SchedulerConfig],
                         sr1024: bool, defaults: dict[str, float | int] | None = None) -> None:
    """model_index.json, tokenizer/ and the scheduler folders: everything of a model folder but the networks (and
    generation_config.json where the model has its own scales or step counts: ValueError, before anything is
    written, for values that read_generation_config would refuse)."""
    generation_values(defaults or {})
    index: dict[str, Any] = {"_class_name": "UnCLIPPipeline", "_diffusers_version": DIFFUSERS_VERSION}
    for comp in COMPONENTS:
        if comp.required:  # optional stages are found by their folder; diffusers would reject them in the index
            index[comp.folder] = [comp.library, comp.class_names[0]]
    tokenizer.save(root / "tokenizer")
    index["tokenizer"] = ["transformers", "CLIPTokenizer"]
    for stage, folder in SCHEDULER_FOLDERS.items():
        if stage == "sr1024" and not sr1024:
            continue
        cfg = config_to_dict(schedulers[stage], {"_class_name": "UnCLIPScheduler"})
        if cfg["beta_schedule"] != "squaredcos_cap_v2":
            cfg["_class_name"] = "DDPMScheduler"
        (root / folder).mkdir(exist_ok=True)
        (root / folder / "scheduler_config.json").write_text(json.dumps(cfg, indent=2))
        if stage != "sr1024":
            index[folder] = ["diffusers", "UnCLIPScheduler"]
    (root / "model_index.json").write_text(json.dumps(index, indent=2))
    if defaults:
        (root / GENERATION_CONFIG).write_text(json.dumps(defaults, indent=2) + "\n")


def save_model(model: UnCLIPModel, path: str | os.PathLike, overwrite: bool = False,
               dtype: torch.dtype | None = None) -> Path:
    """Write `model` as a diffusers-layout folder. Written under a temporary name, then renamed into place."""
    root = Path(path)
    if root.exists() and not overwrite:
        raise FileExistsError(f"{root} already exists; pass overwrite=True or choose another path")
    generation_values(model.defaults or {})  # ValueError before any work: the folder would not load
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.", dir=root.parent))
    os.chmod(tmp, default_mode(directory=True))
    try:
        for comp in COMPONENTS:
            module = getattr(model, comp.attr)
            if module is not None:
                _save_component(module, comp, tmp / comp.folder, dtype)
        write_pipeline_files(tmp, model.tokenizer, model.schedulers, model.sr1024 is not None, model.defaults)
        if root.exists():
            shutil.rmtree(root)
        os.replace(tmp, root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root
