"""Dynamic tiling, token counts and pixel values: plugin vs spec rule vs the plain-PyTorch reference."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from PIL import Image
from reference import ref_dynamic_preprocess, ref_load_image, ref_num_image_tokens

from internvl_plugin.configs import InternVLChatConfig
from internvl_plugin.internvl_image import MAX_TILES_LIMIT, Tiling, choose_grid, image_to_pixel_values, num_tiles

# (width, height) -> {max_num: image tokens}, derived by hand from the rule in spec A3.1 (aspect
# closest, tie -> larger grid only past half its pixels, thumbnail only with >1 tile, 256 per tile)
EXPECTED_TOKENS = {
    (1, 1): {1: 256, 6: 256, 12: 256},
    (448, 448): {1: 256, 6: 256, 12: 256},
    (449, 448): {1: 256, 6: 256, 12: 256},
    (4000, 100): {1: 256, 6: 7 * 256, 12: 13 * 256},
    (100, 4000): {1: 256, 6: 7 * 256, 12: 13 * 256},
    (1920, 1080): {1: 256, 6: 3 * 256, 12: 9 * 256},
}
SPEC_WORKED_EXAMPLES = [  # spec A3.1 table: size, max_num, grid, tiles incl. thumbnail
    ((800, 600), 12, (4, 3), 13), ((800, 600), 6, (3, 2), 7), ((448, 448), 12, (1, 1), 1),
    ((1000, 1000), 12, (3, 3), 10), ((1000, 1000), 6, (2, 2), 5), ((1920, 1080), 12, (4, 2), 9),
    ((1920, 1080), 6, (2, 1), 3), ((300, 1200), 6, (1, 4), 5),
]


@pytest.fixture(scope="module")
def config(tiny_model):
    path = tiny_model("internvl2-2b")
    return InternVLChatConfig(**json.loads((path / "config.json").read_text()))


def _tiling(config, max_num):
    return Tiling.from_config(config, {"max_dynamic_patch": max_num})


def _random_image(w, h, seed):
    g = torch.Generator().manual_seed(seed)
    data = torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8)
    return Image.fromarray(data.numpy())


@pytest.mark.parametrize("size", list(EXPECTED_TOKENS))
@pytest.mark.parametrize("max_num", [1, 6, 12])
def test_token_counts_match_rule_and_reference(config, size, max_num):
    tiling = _tiling(config, max_num)
    ours = 256 * num_tiles(*size, tiling)
    assert ours == EXPECTED_TOKENS[size][max_num]
    ref_cfg = config.to_dict()
    assert ref_num_image_tokens(size[0], size[1], max_num, ref_cfg) == ours


@pytest.mark.parametrize("size,max_num,grid,tiles", SPEC_WORKED_EXAMPLES)
def test_spec_worked_examples(config, size, max_num, grid, tiles):
    tiling = _tiling(config, max_num)
    assert choose_grid(*size, tiling) == grid
    assert num_tiles(*size, tiling) == tiles


@pytest.mark.parametrize("size,max_num", [((1, 1), 6), ((449, 448), 6), ((800, 600), 6), ((300, 1200), 12),
                                          ((1000, 1000), 6), ((37, 501), 12)])
def test_pixel_values_equal_reference(config, size, max_num):
    image = _random_image(*size, seed=size[0] * 7 + size[1])
    ours = image_to_pixel_values(image, _tiling(config, max_num))
    ref = ref_load_image(image, max_num, config.to_dict())
    assert ours.shape == ref.shape
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=0)
    assert len(ref_dynamic_preprocess(image, 1, max_num, 448, True)) == ours.shape[0]


def test_grayscale_and_rgba_are_converted(config):
    for mode in ("L", "RGBA", "P"):
        img = _random_image(300, 200, 1).convert(mode)
        out = image_to_pixel_values(img, _tiling(config, 6))
        assert out.shape[1:] == (3, 448, 448) and torch.isfinite(out).all()


def test_tiling_overrides_are_validated(config, caplog):
    with caplog.at_level(logging.WARNING):
        t = Tiling.from_config(config, {"max_dynamic_patch": 1000})
    assert t.max_num == MAX_TILES_LIMIT and "clamped" in caplog.text
    for bad in ("6", 0, -3, 2.5, True):
        with pytest.raises(ValueError, match="max_dynamic_patch"):
            Tiling.from_config(config, {"max_dynamic_patch": bad})
    with pytest.raises(ValueError, match="smaller than min_dynamic_patch"):
        Tiling.from_config(config, {"max_dynamic_patch": 2, "min_dynamic_patch": 3})
    off = Tiling.from_config(config, {"dynamic_image_size": False})
    assert num_tiles(4000, 100, off) == 1
