"""Test setup shared by every test file.

Without a GPU, Triton kernels run through Triton's interpreter; the variable must be set
before triton (and our @triton.jit kernels) is first imported, hence here, at the top.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture
def rng():
    """A fresh, unseeded-by-default generator: parity tests draw new inputs every run.
    Set RANKGRPO_TEST_SEED to replay a failure; the seed is printed on failure."""
    seed = int(os.environ.get("RANKGRPO_TEST_SEED", torch.seed() % (2**31)))
    g = torch.Generator().manual_seed(seed)
    g.seed_value = seed
    return g


def pytest_report_header(config):
    return f"rankgrpo tests: cuda={torch.cuda.is_available()} " \
           f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET')}"
