"""Helpers the tests share: sessions, data, servers, fault records, storage workers, a backend.

Nothing here is a test.  ``crashkit`` also runs as a script in a child process
(``python -m tests.support.crashkit``); ``storage_helpers`` holds the worker
functions child processes import; ``memory_backend`` is a backend written as a
third-party package would write it.
"""
