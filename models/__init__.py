"""Reference torch networks for every unCLIP stage, presets, and diffusers-layout model folders."""
from unclip.core.identity import NAMES, fingerprint
from unclip.core.tokenizer import CLIPTokenizer
from unclip.models.common import ModelLoadError
from unclip.models.io import SchedulerConfig, UnCLIPModel, load_model, save_model
from unclip.models.presets import PRESETS, build_preset, resolve_model

__all__ = ["ModelLoadError", "SchedulerConfig", "UnCLIPModel", "load_model", "save_model", "NAMES", "PRESETS",
           "build_preset", "CLIPTokenizer", "fingerprint", "resolve_model"]
