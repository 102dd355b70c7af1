"""Shared test setup. Keep this small: fixtures used by one module live in that module.

Tests never reach the network: the Hugging Face libraries are put in offline mode before anything
imports them, so a test that would download fails fast instead of hanging.
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
# the tests' own reward files are trusted code; tests/test_security.py removes this to check the gate
os.environ["APO_TRUST_CODE"] = "1"
# built-in models (the tiny random model, the converted SmolLM2) are cached here for the session
if "APO_CACHE" not in os.environ:
    import tempfile

    os.environ["APO_CACHE"] = os.path.join(tempfile.gettempdir(), "apo-test-cache")

# MKL's products as the apo command runs them (MKL_CBWR on Intel), before anything computes with
# torch: the tests compare runs in this process with runs of `apo` subprocesses bit for bit
from apo_cli.runtime.threads import reproducible_mkl  # noqa: E402

reproducible_mkl(os.environ)

import pytest  # noqa: E402


@pytest.fixture
def cli():
    """Invoke the real `apo` Typer app in-process: ``cli("validate", "r.yaml")`` returns the Result."""
    from typer.testing import CliRunner

    from apo_cli.main import app

    runner = CliRunner()

    def invoke(*args: str):
        return runner.invoke(app, list(args), prog_name="apo")

    return invoke
