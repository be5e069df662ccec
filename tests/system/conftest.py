"""A two-task benchmark in the manifest layout, written once per test module."""

import pytest

COLOURS = {"red": (210, 30, 30), "blue": (30, 40, 210), "green": (30, 180, 50)}
TASKS = {"colour": ("What colour is it?", lambda c: c), "mood": ("How does it feel?", lambda c: f"{c[0]}{c[0]}")}


@pytest.fixture(scope="module")
def bench(tmp_path_factory, make_bench):
    return make_bench(tmp_path_factory.mktemp("bench"), COLOURS, TASKS, train=12, test=3)

