"""Tests of the methods: a package, so that its test_contract and tests/experts/test_contract both collect."""
