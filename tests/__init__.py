"""The test suite (a package so that ``tests.helpers`` is importable from every test folder)."""
