"""The stateful API fuzzer (tests/api_fuzz.py), bounded for CI; `python tests/api_fuzz.py
--examples 500` is the long mode."""

from api_fuzz import CI, DecodeMachine

TestDecodeMachine = DecodeMachine.TestCase
TestDecodeMachine.settings = CI
