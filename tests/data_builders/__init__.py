"""Tests of data_builders."""
