"""Test-time tools for ptutils and for the storage backends built on it.

* :mod:`ptutils.testing.backend_suite`: the backend conformance suite, the very
  tests every built-in backend passes, for a third-party backend to run on its own.
* :mod:`ptutils.testing.assertions`: exact (type-, dtype- and bit-aware) equality of stored values.
* :mod:`ptutils.testing.processes`: worker functions run in clean child processes.

These modules are for tests: they import pytest and hypothesis, and nothing else
in ptutils imports them.  Their ``assert`` statements are rewritten by pytest
(registered here, before any of them is imported), so a failing check shows the
values it compared, as it would in a test file.
"""

import pytest

pytest.register_assert_rewrite(*(f"{__name__}.{module}" for module in ("assertions", "backend_suite", "processes")))
