"""Shared fixtures for data_builders tests: a tiny folder of pristine images made in code."""

from __future__ import annotations

import pytest

from loupe_vlm.data_builders.sources import fractal_texture, save_png


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory):
    """Eight small 'photos' (fractal textures) in a temporary folder."""
    d = tmp_path_factory.mktemp("pristine")
    for i in range(8):
        save_png(d / f"photo{i}.png", fractal_texture(i, 128))
    return d


@pytest.fixture
def photo():
    """A 96x96 RGB test image with edges, gradients and colour."""
    img = fractal_texture(3, 96)
    img[20:60, 30:70] = (200, 40, 40)
    return img
