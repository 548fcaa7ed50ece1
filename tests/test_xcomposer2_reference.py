"""InternLM-XComposer2 without an engine: the plugin's preprocessing and token counts against the spec
tables and the reference, and the reference itself on the invariants of spec xcomposer2.md §10.2 that
need no engine (text-only == InternLM2, prefix isolation, mask exactness, per-module scaling, HD layout
order), its CLIP tower against transformers' CLIPVisionModel."""

from __future__ import annotations

import pytest
import torch
from conftest import random_image
from reference.llm import InternLM2ForCausalLMRef
from reference.xcomposer2 import IMAGE_TOKEN, PLACEHOLDER, load_xcomposer2_reference, ref_build_ids

from internvl_plugin.xcomposer2_image import (XComposer2Layout, hd_grid, hd_layout, hd_num_tokens,
                                              image_to_pixel_values)

LAYOUTS = ("xcomposer2-vl-1.8b", "xcomposer2-vl-7b", "xcomposer2-7b", "xcomposer2-4khd", "xcomposer2d5")

# spec §4.2 (W x H) -> tokens, for the real tile sizes (4KHD 336 px, 2.5 560 px)
SPEC_TABLE = [
    ((1000, 1000), {"4khd-25": 3817, "4khd-55": 7297, "2.5-24": 2061, "2.5-6": 2061}),
    ((1920, 1080), {"4khd-25": 3661, "4khd-55": 8005, "2.5-24": 5281, "2.5-6": 2861}),
    ((1080, 1920), {"4khd-25": 3685, "4khd-55": 8041, "2.5-24": 5301, "2.5-6": 2881}),
    ((336, 336), {"4khd-25": 3817, "4khd-55": 7297, "2.5-24": 841, "2.5-6": 841}),
    ((560, 560), {"4khd-25": 3817, "4khd-55": 7297, "2.5-24": 841, "2.5-6": 841}),
    ((800, 600), {"4khd-25": 3085, "4khd-55": 7141, "2.5-24": 2061, "2.5-6": 2061}),
    ((3840, 1600), {"4khd-25": 3217, "4khd-55": 8137, "2.5-24": 8881, "2.5-6": 2861}),
    ((560, 13440), {"2.5-24": 10501}),  # the 2.5 maximum (spec §10.2 invariant 5)
]


def _real_layout(variant):
    return XComposer2Layout.from_config(type("C", (), {"xcomposer_variant": variant})())


@pytest.mark.parametrize("size,expected", SPEC_TABLE)
def test_token_counts_match_the_spec_table(size, expected):
    for key, tokens in expected.items():
        variant, hd_num = key.split("-")
        layout = _real_layout(variant)
        assert layout.crop_size == {"4khd": 336, "2.5": 560}[variant] and layout.merged == layout.crop_size // 28
        assert layout.num_image_tokens(*size, int(hd_num)) == tokens, key
        h, w = hd_grid(*size, int(hd_num), layout.crop_size, variant)
        assert h * w <= int(hd_num)
    assert _real_layout("4khd").max_image_tokens() == 8737  # hd_num ceiling 55
    assert _real_layout("2.5").max_image_tokens() == 10501


@pytest.mark.parametrize("size", [(1, 1), (336, 336), (1920, 1080), (100, 4000), (4000, 100), (10000, 1)])
@pytest.mark.parametrize("variant", ["4khd", "2.5"])
def test_real_size_pixels_and_grid(size, variant):
    """The processor's resized/padded image has the grid the counter predicts; 10000x1 keeps one row."""
    layout = _real_layout(variant)
    hd_num = layout.default_hd_num
    crops, (h, w) = image_to_pixel_values(random_image(*size, 1), layout, hd_num)
    assert (h, w) == hd_grid(*size, hd_num, layout.crop_size, variant)
    assert crops.shape == (1 + h * w, 3, layout.crop_size, layout.crop_size)
    assert layout.num_image_tokens(*size, hd_num) == hd_num_tokens(h, w, layout.merged)


@pytest.fixture(scope="module")
def refs(tiny_model):
    from transformers import AutoTokenizer

    from internvl_plugin.configs import register_configs

    register_configs()  # the tokenizer and config classes, as the plugin does in vLLM (no remote code)
    built = {}

    def get(layout):
        if layout not in built:
            path = tiny_model(layout)
            tok = AutoTokenizer.from_pretrained(str(path))
            ref = load_xcomposer2_reference(path)
            ref.image_token_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
            built[layout] = path, ref, tok
        return built[layout]

    return get


@pytest.mark.parametrize("layout", LAYOUTS)
def test_plugin_pixels_equal_reference(refs, layout):
    from transformers import AutoConfig

    path, ref, _ = refs(layout)
    plugin = XComposer2Layout.from_config(AutoConfig.from_pretrained(str(path)))
    assert plugin.variant == ref.variant and plugin.crop_size == ref.crop
    for size in [(120, 90), (70, 200), (1, 1), (500, 37)]:
        image = random_image(*size, 7)
        got, grid = image_to_pixel_values(image, plugin, plugin.default_hd_num)
        want, want_grid = ref.preprocess(image)
        assert grid == want_grid
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_clip_tower_matches_transformers(refs):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    _, ref, _ = refs("xcomposer2-vl-1.8b")
    cfg = CLIPVisionConfig(**{k: v for k, v in ref.vit_cfg.items()}, image_size=ref.crop)
    hf = CLIPVisionModel(cfg).eval()
    missing = hf.load_state_dict(ref.vit.vision_model.state_dict(), strict=False)  # transformers 5: flat
    assert set(missing.missing_keys) == {"post_layernorm.weight", "post_layernorm.bias"}
    pixels = torch.randn(2, 3, ref.crop, ref.crop)
    with torch.no_grad():
        want = hf(pixel_values=pixels, output_hidden_states=True).hidden_states[-1][:, 1:]
    torch.testing.assert_close(ref.vit(pixels), want, atol=1e-5, rtol=1e-5)


def _strip_plora(ref):
    """The InternLM2 reference of tests/reference/llm.py on the same weights, Plora tensors left out."""
    lm = InternLM2ForCausalLMRef(dict(ref.config, rope_scaling=None, architectures=["InternLM2ForCausalLM"]))
    state = {k: v for k, v in ref.state_dict().items()
             if k.startswith(("model.", "output.")) and "Plora" not in k}
    lm.load_state_dict(state, strict=True)
    return lm.eval()


@pytest.mark.parametrize("layout", ["xcomposer2-vl-1.8b", "xcomposer2-4khd"])
def test_text_only_is_internlm2(refs, layout):
    """Invariant 1 (reference side; the engine side is test_xcomposer2_text.py)."""
    _, ref, tok = refs(layout)
    ids = tok("A plain text prompt without any image at all.").input_ids
    embeds, mask = ref.embed(ids, [])
    assert not mask.any()
    with torch.no_grad():
        torch.testing.assert_close(ref.logits_from_embeds(embeds, mask), _strip_plora(ref)(torch.tensor(ids)),
                                   atol=1e-5, rtol=1e-5)


def _image_prompt(ref, tok, image, prefix="Some text before the picture: "):
    count = ref.num_image_tokens(ref.preprocess(image)[1])
    return ref_build_ids(tok, f"{prefix}{PLACEHOLDER} and some text after it.", [count], ref.image_token_id)


@pytest.mark.parametrize("layout", ["xcomposer2-vl-1.8b", "xcomposer2-4khd"])
def test_prefix_isolation(refs, layout):
    """Invariant 2: logits before the first image do not depend on the Plora weights or the image."""
    _, ref, tok = refs(layout)
    image = random_image(120, 90, 1)
    ids = _image_prompt(ref, tok, image)
    first = ids.index(ref.image_token_id)
    with torch.no_grad():
        base = ref.logits_from_embeds(*ref.embed(ids, [image]))
        other = ref.logits_from_embeds(*ref.embed(ids, [random_image(120, 90, 9)]))
        saved = {k: v.clone() for k, v in ref.state_dict().items() if "Plora_B" in k}
        try:
            for name, p in ref.named_parameters():
                if "Plora_B" in name:
                    p.mul_(-50.0)
            changed = ref.logits_from_embeds(*ref.embed(ids, [image]))
        finally:
            ref.load_state_dict(saved, strict=False)
    torch.testing.assert_close(changed[:first], base[:first], atol=0, rtol=0)
    torch.testing.assert_close(other[:first], base[:first], atol=0, rtol=0)
    assert (changed[first:] - base[first:]).abs().max() > 1.0  # the LoRA does act on and after the image


@pytest.mark.parametrize("layout", ["xcomposer2-vl-1.8b", "xcomposer2-4khd"])
@pytest.mark.parametrize("module", ["attention.wqkv", "attention.wo", "feed_forward.w1", "feed_forward.w3",
                                    "feed_forward.w2"])
def test_mask_exactness(refs, layout, module):
    """Invariant 3: a large Plora_B on one module of layer 1 changes that module's output on the image
    rows (separators included) and on no text row; the module's input is the same in both runs."""
    _, ref, tok = refs(layout)
    image = random_image(120, 90, 1)
    ids = _image_prompt(ref, tok, image)
    mask = torch.tensor(ids) == ref.image_token_id
    target = ref.model.layers[1].get_submodule(module)
    seen = []
    hook = target.register_forward_hook(lambda mod, args, out: seen.append((args[0].clone(), out.clone())))
    try:
        with torch.no_grad():
            embeds, m = ref.embed(ids, [image])
            ref.logits_from_embeds(embeds, m)
            original = target.Plora_B.weight.clone()
            target.Plora_B.weight.fill_(10.0)
            ref.logits_from_embeds(embeds, m)
            target.Plora_B.weight.copy_(original)
    finally:
        hook.remove()
    (x0, y0), (x1, y1) = seen
    torch.testing.assert_close(x1, x0, atol=0, rtol=0)
    row_changed = (y1 - y0).abs().amax(-1) > 0
    assert torch.equal(row_changed, mask)


def test_scaling_is_alpha_over_rank(refs, tiny_model, tmp_path):
    """Invariant 9: 4KHD's wqkv has r=8 -> alpha 16 (scale 2); doubling alpha doubles the LoRA part."""
    import json
    import shutil

    path, ref, tok = refs("xcomposer2-4khd")
    wqkv = ref.model.layers[0].attention.wqkv
    assert wqkv.Plora_A.weight.shape[0] == 8 and wqkv.lora_scaling == 2.0
    assert ref.model.layers[0].attention.wo.lora_scaling == 1.0
    copy = tmp_path / "alpha32"
    shutil.copytree(path, copy)
    cfg = json.loads((copy / "config.json").read_text())
    cfg["plora_alpha"] = {"wqkv": 32}
    (copy / "config.json").write_text(json.dumps(cfg))
    ref2 = load_xcomposer2_reference(copy)
    x = torch.randn(5, ref.shape.hidden)
    m = torch.tensor([False, True, True, False, True])
    with torch.no_grad():
        base = torch.nn.functional.linear(x, wqkv.weight)
        lora1 = wqkv(x, m) - base
        lora2 = ref2.model.layers[0].attention.wqkv(x, m) - base
    torch.testing.assert_close(lora2, 2 * lora1, atol=1e-5, rtol=1e-5)
    assert lora1[~m].abs().max() == 0 and lora1[m].abs().min() >= 0


def test_hd_layout_order():
    """Invariant 7: the plugin's layout puts tile (row//n, col//n) cell (row%n, col%n) at
    n(n+1) + 1 + row(wn+1) + col, sub_GN at the end of every row, glb_GN between the blocks."""
    g, c, h, w = 4, 3, 2, 3
    n = g // 2
    feats = torch.randn(1 + h * w, g * g, c)
    glb, sub = torch.randn(1, 1, 4 * c), torch.randn(1, 1, 1, 4 * c)
    rows = hd_layout(feats, h, w, glb, sub)
    assert rows.shape == (hd_num_tokens(h, w, n), 4 * c)

    def merged(crop, i, j):
        f = feats[crop].view(g, g, c)
        return torch.cat([f[2 * i, 2 * j], f[2 * i, 2 * j + 1], f[2 * i + 1, 2 * j], f[2 * i + 1, 2 * j + 1]])

    for i in range(n):
        for j in range(n):
            assert torch.equal(rows[i * (n + 1) + j], merged(0, i, j))
        assert torch.equal(rows[i * (n + 1) + n], sub.flatten())
    assert torch.equal(rows[n * (n + 1)], glb.flatten())
    base = n * (n + 1) + 1
    for r in range(h * n):
        for col in range(w * n):
            tile = (r // n) * w + col // n
            assert torch.equal(rows[base + r * (w * n + 1) + col], merged(1 + tile, r % n, col % n))
        assert torch.equal(rows[base + r * (w * n + 1) + w * n], sub.flatten())


def test_processor_hooks_exist_in_vllm():
    """xcomposer2.py overrides BaseMultiModalProcessor.apply (fixing 2.5's multi-image hd_num into the
    request's kwargs with dataclasses.replace) and _apply_prompt_updates (segment-wise encoding), as in
    vLLM 0.32; test_plugin.py checks the helpers _apply_prompt_updates calls. A rename would silently stop them."""
    import dataclasses
    import inspect

    from vllm.multimodal.processing import BaseMultiModalProcessor
    from vllm.multimodal.processing.inputs import ProcessorInputs

    from internvl_plugin.xcomposer2 import XComposer2MultiModalProcessor

    assert list(inspect.signature(BaseMultiModalProcessor.apply).parameters) == ["self", "inputs", "timing_ctx"]
    assert "hf_processor_mm_kwargs" in {f.name for f in dataclasses.fields(ProcessorInputs)}
    for name in ("apply", "_apply_prompt_updates", "_call_hf_processor"):
        assert getattr(XComposer2MultiModalProcessor, name) is not getattr(BaseMultiModalProcessor, name), name


def test_config_dispatch_and_variant(tiny_model):
    """No remote code runs; 4KHD's declared InternLM2ForCausalLM goes to the XComposer2 class when its
    auto_map names it, a plain InternLM2 checkpoint keeps vLLM's InternLM2ForCausalLM."""
    from transformers import AutoConfig

    from internvl_plugin.configs import register_configs
    from internvl_plugin.xcomposer2_image import infer_variant

    register_configs()
    want = {"xcomposer2-vl-1.8b": "vl", "xcomposer2-7b": "vl", "xcomposer2-4khd": "4khd", "xcomposer2d5": "2.5"}
    for layout, variant in want.items():
        cfg = AutoConfig.from_pretrained(str(tiny_model(layout)), trust_remote_code=False)
        assert cfg.architectures == ["InternLMXComposer2ForCausalLM"], layout
        assert infer_variant(cfg) == variant, layout
    plain = AutoConfig.from_pretrained(str(tiny_model("internlm2")), trust_remote_code=False)
    assert plain.architectures == ["InternLM2ForCausalLM"]
    hd = AutoConfig.from_pretrained(str(tiny_model("xcomposer2-4khd")), trust_remote_code=False)
    assert hd.declared_architecture == "InternLM2ForCausalLM"
    hd.xcomposer_variant = "2.5"  # what hf_overrides={"xcomposer_variant": ...} sets
    assert infer_variant(hd) == "2.5"
