"""Collect ``bench_<op>.py`` files (pytest's default pattern only takes ``test_*.py``)."""

from __future__ import annotations

import pytest


def pytest_collect_file(file_path, parent):
    # A path given on the command line is collected by pytest itself; collecting it here too would run it twice.
    if file_path.suffix == ".py" and file_path.name.startswith("bench_") and not parent.session.isinitpath(file_path):
        return pytest.Module.from_parent(parent, path=file_path)
    return None
