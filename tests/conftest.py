import logging
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))  # tests/refs.py: reference builders shared by the tests

torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _quiet_logs(caplog):
    caplog.set_level(logging.WARNING)
    yield
