"""Local NATS, PostgreSQL and OCI registry for ``make up`` and the test suite.

``servers`` runs them as subprocesses, ``pytest_plugin`` gives tests session fixtures of
them, ``testing`` has async helpers for assertions, ``up``/``down`` are ``make up``/``make
down``. Nothing is imported here, so loading the pytest plugin stays cheap.
"""
