"""A two-task benchmark in the manifest layout, written once per test module."""

import pytest

COLOURS = {"red": (210, 30, 30), "blue": (30, 40, 210), "green": (30, 180, 50)}


@pytest.fixture(scope="module")
def bench(tmp_path_factory, make_bench):
    return make_bench(tmp_path_factory.mktemp("bench"), COLOURS, train=12, test=3)
