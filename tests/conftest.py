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
def rng(request):
    """A generator with a fresh seed each run: parity tests draw new inputs every time.
    Set RANKGRPO_TEST_SEED to replay a failure; the seed is in the test's report."""
    given = os.environ.get("RANKGRPO_TEST_SEED")
    # torch.seed() reseeds the global generator: call it only when no seed is replayed, so a
    # replay leaves the global RNG state alone.
    seed = int(given) if given is not None else torch.seed() % (2**31)
    request.node.user_properties.append(("seed", seed))
    print(f"RANKGRPO_TEST_SEED={seed}")
    return torch.Generator().manual_seed(seed)


def pytest_report_header(config):
    return f"rankgrpo tests: cuda={torch.cuda.is_available()} " \
           f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET')}"
