"""The one-thread fixture of the tests that train tiny models (unit and e2e).

Shared so both suites pin torch the same way; a test module opts in by
importing :func:`one_thread` (it is autouse, module-scoped). torch is imported
inside the fixture, so importing this module stays cheap.
"""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models train fastest on one thread; OpenMP spinning on a shared box is slow."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
