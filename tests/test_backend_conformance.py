"""The backend conformance suite (:mod:`ptutils.testing.backend_suite`) on each of our backends.

Each test runs once per backend selected with ``--backends``: the ``db``
fixture of conftest.py gives it a fresh collection on that backend.  The tests
themselves ship with ptutils, so a third-party backend runs these very ones
(see tests/test_third_party_backend.py).
"""

from __future__ import annotations

from ptutils.testing.backend_suite import BackendSuite


class TestBackendConformance(BackendSuite):
    """Every built-in backend has every capability the suite knows."""
