import logging
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))  # tests/refs.py: reference builders shared by the tests

torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def tiny_export(tmp_path_factory):
    """The tiny preset exported to ONNX once per test session, for the tests that only read an export (a test
    that changes an export works on a copy)."""
    from unclip.export.onnx_export import export_model
    from unclip.models import build_preset
    out = tmp_path_factory.mktemp("tiny-export") / "tiny"
    export_model(build_preset("tiny"), out, source="tiny")
    return out


@pytest.fixture(autouse=True)
def _quiet_logs(caplog):
    caplog.set_level(logging.WARNING)
    yield
