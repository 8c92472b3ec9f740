"""The optional packages of the runtimes, checked with one line naming what to install."""
from __future__ import annotations

from unclip.core.errors import BackendUnavailable


def require_onnxruntime():
    try:
        import onnxruntime
    except ImportError:
        raise BackendUnavailable("the onnxruntime backend needs the onnxruntime package: pip install onnxruntime "
                                 "(or onnxruntime-gpu for CUDA, never both)") from None
    onnxruntime.set_default_logger_severity(3)  # its graph optimiser's notes are not the user's business
    return onnxruntime


def require_tensorrt():
    try:
        import tensorrt as trt
    except ImportError:
        raise BackendUnavailable("TensorRT is not installed: pip install tensorrt (version 10, NVIDIA's wheels, on a "
                                 "machine with an NVIDIA GPU and driver)") from None
    import torch
    if not torch.cuda.is_available():
        raise BackendUnavailable("TensorRT needs an NVIDIA GPU, and torch sees none here")
    return trt
