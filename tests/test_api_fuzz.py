"""The stateful API fuzzer (tests/api_fuzz.py), bounded for CI; `python tests/api_fuzz.py
--examples 500` is the long mode."""

import pytest
import torch

from api_fuzz import CI, CI_BACKEND, BackendMachine, DecodeMachine

TestDecodeMachine = DecodeMachine.TestCase
TestDecodeMachine.settings = CI
TestBackendMachine = pytest.mark.slow(BackendMachine.TestCase)
TestBackendMachine.settings = CI_BACKEND


def teardown_module():
    torch._dynamo.reset()
