"""Reference torch networks for every unCLIP stage, presets, and diffusers-layout model folders."""
from unclip.models.common import ModelLoadError
from unclip.models.io import SchedulerConfig, UnCLIPModel, load_model, save_model
from unclip.models.presets import PRESETS, build_preset
from unclip.models.tokenizer import CLIPTokenizer

__all__ = ["ModelLoadError", "SchedulerConfig", "UnCLIPModel", "load_model", "save_model", "PRESETS",
           "build_preset", "CLIPTokenizer"]
