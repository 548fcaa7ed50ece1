"""Tests of the plain-PyTorch InternVL reference (tests/reference/).

The reference is the ground truth the plugin is checked against, so it is itself checked against
independent implementations where they exist (transformers' stock Qwen2, Llama and native InternVL)
and against the worked examples of specs/internvl-and-quant.md PART A where they do not.
Checkpoints are tiny and random, built here with the weight names of spec A2.
"""

from __future__ import annotations

import ast
import json
import math
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from reference import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    load_reference,
    pixel_shuffle,
    ref_build_prompt,
    ref_candidate_grids,
    ref_dynamic_preprocess,
    ref_find_closest_aspect_ratio,
    ref_load_image,
    ref_num_image_tokens,
    ref_num_tiles,
    ref_stop_token,
    split_internlm2_wqkv,
)
from safetensors.torch import save_file

IMG_START, IMG_END, IMG_CONTEXT = 3, 4, 5  # token ids used by the tiny checkpoints


# ----------------------------------------------------------------------------------------------
# tiny checkpoints


def tiny_config(llm: str, *, norm_type="rms_norm", qkv_bias=False, qk_normalization=True, ps_version="v1",
                select_layer=-1, tie=False) -> dict:
    vision = dict(
        architectures=["InternVisionModel"], image_size=56, patch_size=14, hidden_size=32,
        num_attention_heads=4, intermediate_size=64, num_hidden_layers=2, qkv_bias=qkv_bias,
        qk_normalization=qk_normalization, norm_type=norm_type, layer_norm_eps=1e-6, hidden_act="gelu",
    )
    text = dict(
        vocab_size=160, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=96, rms_norm_eps=1e-6, rope_theta=1000.0, rope_scaling=None,
        tie_word_embeddings=tie, max_position_embeddings=512, hidden_act="silu",
    )
    if llm == "internlm2":
        text.update(architectures=["InternLM2ForCausalLM"], model_type="internlm2", bias=False)
    else:
        text.update(architectures=["Qwen2ForCausalLM"], model_type="qwen2")
    return dict(
        architectures=["InternVLChatModel"], model_type="internvl_chat", vision_config=vision, llm_config=text,
        select_layer=select_layer, force_image_size=56, downsample_ratio=0.5, ps_version=ps_version,
        dynamic_image_size=True, use_thumbnail=True, min_dynamic_patch=1, max_dynamic_patch=6,
        template="internvl2_5" if llm == "qwen2" else "internlm2-chat",
    )


def weight_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """Every weight name of spec A2 with its shape, written out independently of the reference."""
    v, t = config["vision_config"], config["llm_config"]
    H, F, grid = v["hidden_size"], v["intermediate_size"], v["image_size"] // v["patch_size"]
    shapes = {
        "vision_model.embeddings.class_embedding": (1, 1, H),
        "vision_model.embeddings.patch_embedding.weight": (H, 3, v["patch_size"], v["patch_size"]),
        "vision_model.embeddings.patch_embedding.bias": (H,),
        "vision_model.embeddings.position_embedding": (1, 1 + grid * grid, H),
    }
    for i in range(v["num_hidden_layers"]):
        p = f"vision_model.encoder.layers.{i}."
        for norm in ("norm1", "norm2"):
            shapes[p + norm + ".weight"] = (H,)
            if v["norm_type"] == "layer_norm":
                shapes[p + norm + ".bias"] = (H,)
        shapes[p + "attn.qkv.weight"] = (3 * H, H)
        if v["qkv_bias"]:
            shapes[p + "attn.qkv.bias"] = (3 * H,)
        if v["qk_normalization"]:
            shapes[p + "attn.q_norm.weight"] = (H,)
            shapes[p + "attn.k_norm.weight"] = (H,)
        shapes.update({p + "attn.proj.weight": (H, H), p + "attn.proj.bias": (H,), p + "ls1": (H,), p + "ls2": (H,),
                       p + "mlp.fc1.weight": (F, H), p + "mlp.fc1.bias": (F,),
                       p + "mlp.fc2.weight": (H, F), p + "mlp.fc2.bias": (H,)})
    Hl, wide = t["hidden_size"], 4 * H
    shapes.update({"mlp1.0.weight": (wide,), "mlp1.0.bias": (wide,), "mlp1.1.weight": (Hl, wide),
                   "mlp1.1.bias": (Hl,), "mlp1.3.weight": (Hl, Hl), "mlp1.3.bias": (Hl,)})
    V, I = t["vocab_size"], t["intermediate_size"]
    D = Hl // t["num_attention_heads"]
    q, kv = t["num_attention_heads"] * D, t["num_key_value_heads"] * D
    lm = "language_model.model."
    shapes[lm + "norm.weight"] = (Hl,)
    if t["architectures"] == ["InternLM2ForCausalLM"]:
        shapes[lm + "tok_embeddings.weight"] = (V, Hl)
        for i in range(t["num_hidden_layers"]):
            p = f"{lm}layers.{i}."
            shapes.update({p + "attention.wqkv.weight": (q + 2 * kv, Hl), p + "attention.wo.weight": (Hl, q),
                           p + "feed_forward.w1.weight": (I, Hl), p + "feed_forward.w3.weight": (I, Hl),
                           p + "feed_forward.w2.weight": (Hl, I), p + "attention_norm.weight": (Hl,),
                           p + "ffn_norm.weight": (Hl,)})
        if not t["tie_word_embeddings"]:
            shapes["language_model.output.weight"] = (V, Hl)
    else:
        shapes[lm + "embed_tokens.weight"] = (V, Hl)
        for i in range(t["num_hidden_layers"]):
            p = f"{lm}layers.{i}."
            shapes.update({p + "self_attn.q_proj.weight": (q, Hl), p + "self_attn.q_proj.bias": (q,),
                           p + "self_attn.k_proj.weight": (kv, Hl), p + "self_attn.k_proj.bias": (kv,),
                           p + "self_attn.v_proj.weight": (kv, Hl), p + "self_attn.v_proj.bias": (kv,),
                           p + "self_attn.o_proj.weight": (Hl, q), p + "mlp.gate_proj.weight": (I, Hl),
                           p + "mlp.up_proj.weight": (I, Hl), p + "mlp.down_proj.weight": (Hl, I),
                           p + "input_layernorm.weight": (Hl,), p + "post_attention_layernorm.weight": (Hl,)})
        if not t["tie_word_embeddings"]:
            shapes["language_model.lm_head.weight"] = (V, Hl)
    return shapes


def random_weights(config: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in weight_shapes(config).items():
        noise = torch.randn(shape, generator=gen)
        if (len(shape) == 1 and "norm" in name and name.endswith(".weight")) or name == "mlp1.0.weight":
            state[name] = 1.0 + 0.1 * noise
        elif name.endswith(("ls1", "ls2")):
            state[name] = 0.5 + 0.1 * noise
        elif name.endswith(("class_embedding", "position_embedding", "embeddings.weight", "embed_tokens.weight")):
            state[name] = 0.5 * noise
        elif len(shape) == 1:  # biases
            state[name] = 0.1 * noise
        else:  # fan-in scaled, a little hot so that logits are far from flat
            state[name] = 1.5 * noise / math.prod(shape[1:]) ** 0.5
    return state


def write_checkpoint(folder: Path, config: dict, state: dict[str, torch.Tensor]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    names = sorted(state)
    half = len(names) // 2  # two shards, as real checkpoints come
    save_file({n: state[n].contiguous() for n in names[:half]}, str(folder / "model-00001-of-00002.safetensors"))
    save_file({n: state[n].contiguous() for n in names[half:]}, str(folder / "model-00002-of-00002.safetensors"))
    return folder


def prompt_ids(tiles: int, tokens_per_tile: int = 4) -> torch.Tensor:
    return torch.tensor([1, 7, 8, IMG_START] + [IMG_CONTEXT] * (tiles * tokens_per_tile) + [IMG_END, 9, 10, 11, 12])


# ----------------------------------------------------------------------------------------------
# (1) the Qwen2 decoder against transformers


@pytest.mark.parametrize("tie", [False, True])
def test_qwen2_decoder_matches_transformers(tmp_path, tie):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = tiny_config("qwen2", tie=tie)
    t = config["llm_config"]
    hf_config = Qwen2Config(
        vocab_size=t["vocab_size"], hidden_size=t["hidden_size"], intermediate_size=t["intermediate_size"],
        num_hidden_layers=t["num_hidden_layers"], num_attention_heads=t["num_attention_heads"],
        num_key_value_heads=t["num_key_value_heads"], rms_norm_eps=t["rms_norm_eps"],
        max_position_embeddings=t["max_position_embeddings"], tie_word_embeddings=tie,
        rope_parameters={"rope_type": "default", "rope_theta": t["rope_theta"]},
    )
    hf_config._attn_implementation = "eager"
    torch.manual_seed(0)
    hf = Qwen2ForCausalLM(hf_config).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.copy_(1.0 + 0.1 * torch.randn_like(p) if "norm" in name else 0.15 * torch.randn_like(p))

    state = {k: v for k, v in random_weights(config).items() if not k.startswith("language_model.")}
    state.update({"language_model." + k: v.clone() for k, v in hf.state_dict().items()
                  if not (tie and k == "lm_head.weight")})
    ref = load_reference(write_checkpoint(tmp_path / "ckpt", config, state))

    ids = torch.randint(0, t["vocab_size"], (23,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(ids[None]).logits[0]
    got = ref(ids)
    assert expected.std() > 0.5, "logits too flat to compare"
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ref.language_model(ids), expected, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------------
# (2) InternLM2 wqkv interleave


def interleave_wqkv(wq, wk, wv, heads, kv_heads, head_dim):
    """Spec A2.3 layout, built by hand: per KV group, its query heads, then its key, then its value."""
    group = heads // kv_heads
    rows = []
    for g in range(kv_heads):
        for j in range(group):
            rows.append(wq[(g * group + j) * head_dim:(g * group + j + 1) * head_dim])
        rows.append(wk[g * head_dim:(g + 1) * head_dim])
        rows.append(wv[g * head_dim:(g + 1) * head_dim])
    return torch.cat(rows)


def test_internlm2_wqkv_split():
    heads, kv_heads, D, hidden = 6, 2, 3, 5
    # every row labelled: q rows 1000+, k rows 2000+, v rows 3000+; columns add 0.01*col
    col = 0.01 * torch.arange(hidden)
    wq = torch.arange(heads * D)[:, None] + 1000.0 + col
    wk = torch.arange(kv_heads * D)[:, None] + 2000.0 + col
    wv = torch.arange(kv_heads * D)[:, None] + 3000.0 + col
    wqkv = interleave_wqkv(wq, wk, wv, heads, kv_heads, D)
    assert wqkv[:D, 0].tolist() == [1000, 1001, 1002]  # group 0 starts with query head 0
    assert wqkv[3 * D:4 * D, 0].tolist() == [2000, 2001, 2002]  # then key head 0
    assert wqkv[5 * D:6 * D, 0].tolist() == [1009, 1010, 1011]  # group 1 starts with query head 3

    q, k, v = split_internlm2_wqkv(wqkv.T, heads, kv_heads, D)  # split acts on the output dim
    assert torch.equal(q.T, wq) and torch.equal(k.T, wk) and torch.equal(v.T, wv)
    x = torch.randn(4, hidden, dtype=torch.float64)
    q, k, v = split_internlm2_wqkv(x @ wqkv.double().T, heads, kv_heads, D)
    torch.testing.assert_close(q, x @ wq.double().T)
    torch.testing.assert_close(k, x @ wk.double().T)
    torch.testing.assert_close(v, x @ wv.double().T)


def test_internlm2_decoder_matches_transformers_llama(tmp_path):
    """InternLM2 is Llama with a fused, interleaved wqkv: un-fuse by hand and compare."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = tiny_config("internlm2")
    t = config["llm_config"]
    state = random_weights(config, seed=3)
    ref = load_reference(write_checkpoint(tmp_path / "ckpt", config, state))

    hf_config = LlamaConfig(
        vocab_size=t["vocab_size"], hidden_size=t["hidden_size"], intermediate_size=t["intermediate_size"],
        num_hidden_layers=t["num_hidden_layers"], num_attention_heads=t["num_attention_heads"],
        num_key_value_heads=t["num_key_value_heads"], rms_norm_eps=t["rms_norm_eps"],
        max_position_embeddings=t["max_position_embeddings"], tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": t["rope_theta"]},
        attention_bias=False, mlp_bias=False,
    )
    hf_config._attn_implementation = "eager"
    hf = LlamaForCausalLM(hf_config).eval()
    heads, kv_heads = t["num_attention_heads"], t["num_key_value_heads"]
    D = t["hidden_size"] // heads
    group = heads // kv_heads
    llama = {"model.embed_tokens.weight": state["language_model.model.tok_embeddings.weight"],
             "model.norm.weight": state["language_model.model.norm.weight"],
             "lm_head.weight": state["language_model.output.weight"]}
    for i in range(t["num_hidden_layers"]):
        p, d = f"language_model.model.layers.{i}.", f"model.layers.{i}."
        grouped = state[p + "attention.wqkv.weight"].view(kv_heads, group + 2, D, -1)
        llama.update({
            d + "self_attn.q_proj.weight": grouped[:, :group].reshape(heads * D, -1),
            d + "self_attn.k_proj.weight": grouped[:, group].reshape(kv_heads * D, -1),
            d + "self_attn.v_proj.weight": grouped[:, group + 1].reshape(kv_heads * D, -1),
            d + "self_attn.o_proj.weight": state[p + "attention.wo.weight"],
            d + "mlp.gate_proj.weight": state[p + "feed_forward.w1.weight"],
            d + "mlp.up_proj.weight": state[p + "feed_forward.w3.weight"],
            d + "mlp.down_proj.weight": state[p + "feed_forward.w2.weight"],
            d + "input_layernorm.weight": state[p + "attention_norm.weight"],
            d + "post_attention_layernorm.weight": state[p + "ffn_norm.weight"],
        })
    hf.load_state_dict(llama, strict=True)
    ids = torch.randint(0, t["vocab_size"], (19,), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = hf(ids[None]).logits[0]
    assert expected.std() > 0.5
    torch.testing.assert_close(ref(ids), expected, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------------
# (3) pixel shuffle index map (spec A3.3)


@pytest.mark.parametrize("grid", [4, 32])
@pytest.mark.parametrize("ps_version", ["v1", "v2"])
def test_pixel_shuffle_index_map(grid, ps_version):
    C = 3
    rows = torch.arange(grid).view(grid, 1, 1)
    cols = torch.arange(grid).view(1, grid, 1)
    chans = torch.arange(C).view(1, 1, C)
    x = (rows * 10000 + cols * 100 + chans).float()[None].repeat(2, 1, 1, 1)  # label = (row, col, c)
    out = pixel_shuffle(x, 0.5, ps_version)
    half = grid // 2
    assert out.shape == (2, half, half, 4 * C)
    tokens = out.reshape(2, half * half, 4 * C)
    for br in range(half):
        for bc in range(half):
            t = br * half + bc if ps_version == "v2" else bc * half + br
            for m in range(2):
                for k in range(2):
                    for c in range(C):
                        assert tokens[1, t, m * 2 * C + k * C + c] == (2 * br + m) * 10000 + (2 * bc + k) * 100 + c
    if grid == 4:  # the spec's own example: top-left corners of the blocks, token by token
        corners = [(int(v) // 10000 // 2, int(v) // 100 % 100 // 2) for v in tokens[0, :, 0]]
        assert corners == ([(0, 0), (0, 1), (1, 0), (1, 1)] if ps_version == "v2" else [(0, 0), (1, 0), (0, 1), (1, 1)])


def test_pixel_shuffle_v2_matches_transformers():
    from transformers.models.internvl.modeling_internvl import InternVLModel

    x = torch.randn(3, 8, 8, 5)
    torch.testing.assert_close(pixel_shuffle(x, 0.5, "v2"), InternVLModel.pixel_shuffle(None, x, 0.5), rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------
# (4) tiling (spec A3.1)

STANDARD = dict(vision_config=dict(image_size=448, patch_size=14), force_image_size=448, downsample_ratio=0.5,
                dynamic_image_size=True, use_thumbnail=True, min_dynamic_patch=1, max_dynamic_patch=12,
                template="internlm2-chat")

WORKED_EXAMPLES = [  # W, H, max_num, (cols, rows), tiles incl. thumbnail, image tokens
    (800, 600, 12, (4, 3), 13, 3328),
    (800, 600, 6, (3, 2), 7, 1792),
    (448, 448, 12, (1, 1), 1, 256),
    (1000, 1000, 12, (3, 3), 10, 2560),
    (1000, 1000, 6, (2, 2), 5, 1280),
    (1920, 1080, 12, (4, 2), 9, 2304),
    (1920, 1080, 6, (2, 1), 3, 768),
    (300, 1200, 6, (1, 4), 5, 1280),
]


def test_candidate_order_max6():
    assert ref_candidate_grids(1, 6) == [(1, 1), (1, 2), (2, 1), (3, 1), (1, 3), (4, 1), (1, 4), (2, 2), (1, 5),
                                         (5, 1), (6, 1), (2, 3), (1, 6), (3, 2)]


@pytest.mark.parametrize("width,height,max_num,grid,tiles,tokens", WORKED_EXAMPLES)
def test_tiling_worked_examples(width, height, max_num, grid, tiles, tokens):
    candidates = ref_candidate_grids(1, max_num)
    assert ref_find_closest_aspect_ratio(width / height, candidates, width, height, 448) == grid
    crops = ref_dynamic_preprocess(Image.new("RGB", (width, height)), 1, max_num, 448, True)
    assert len(crops) == tiles and all(c.size == (448, 448) for c in crops)
    assert ref_num_tiles(width, height, max_num, STANDARD) == tiles
    assert ref_num_image_tokens(width, height, max_num, STANDARD) == tokens


def test_tiles_row_major_thumbnail_last_and_normalized():
    S, colors = 448, {}
    image = Image.new("RGB", (3 * S, 2 * S))
    for k in range(6):  # 3 columns x 2 rows, already the target size so the resize is a no-op
        colors[k] = (40 * k, 255 - 30 * k, 7 * k)
        image.paste(colors[k], ((k % 3) * S, (k // 3) * S, (k % 3 + 1) * S, (k // 3 + 1) * S))
    crops = ref_dynamic_preprocess(image, 1, 6, S, True)
    assert len(crops) == 7
    for k in range(6):
        assert crops[k].getpixel((S // 2, S // 2)) == colors[k]
    assert crops[6].size == (S, S) and crops[6].getpixel((20, 20)) == colors[0]  # thumbnail of the whole image

    pixels = ref_load_image(image, 6, STANDARD)
    assert pixels.shape == (7, 3, S, S) and pixels.dtype == torch.float32
    for c in range(3):
        want = (colors[4][c] / 255 - IMAGENET_MEAN[c]) / IMAGENET_STD[c]
        assert abs(pixels[4, c, 100, 100].item() - want) < 1e-6
    # no tiling when the config turns dynamic_image_size off
    assert ref_load_image(image, 6, {**STANDARD, "dynamic_image_size": False}).shape == (1, 3, S, S)
    assert ref_load_image(Image.new("L", (500, 300)), None, STANDARD).shape[1] == 3  # grey -> RGB


# ----------------------------------------------------------------------------------------------
# (5) prompts (spec A3.4, A4.1)

SYS2 = "你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, 是一个有用无害的人工智能助手。"
SYS25 = "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。"
ONE_TURN = {
    "internlm2-chat": "<|im_start|>system\n{SYS}<|im_end|><|im_start|>user\n{Q}<|im_end|><|im_start|>assistant\n",
    "Hermes-2": "<|im_start|>system\n{SYS}<|im_end|><|im_start|>user\n{Q}<|im_end|><|im_start|>assistant\n",
    "phi3-chat": "<|system|>\n{SYS}<|end|><|user|>\n{Q}<|end|><|assistant|>\n",
    "internvl2_5": "<|im_start|>system\n{SYS}<|im_end|>\n<|im_start|>user\n{Q}<|im_end|>\n<|im_start|>assistant\n",
}


@pytest.mark.parametrize("template", sorted(ONE_TURN))
def test_one_turn_prompts(template):
    config = {**STANDARD, "template": template}
    sys_message = SYS25 if template == "internvl2_5" else SYS2
    expand = ONE_TURN[template].replace("{SYS}", sys_message)
    block = "<img>" + "<IMG_CONTEXT>" * 256 * 3 + "</img>"

    assert ref_build_prompt("What is this?", [3], config) == expand.replace("{Q}", block + "\nWhat is this?")
    assert ref_build_prompt("Look: <image> ok?", [3], config) == expand.replace("{Q}", "Look: " + block + " ok?")
    assert ref_build_prompt("Hi", [], config) == expand.replace("{Q}", "Hi")
    assert ref_build_prompt("Hi", None, config, system_message="S") == ONE_TURN[template].replace(
        "{SYS}", "S").replace("{Q}", "Hi")
    assert ref_stop_token(template) == ("<|end|>" if template == "phi3-chat" else "<|im_end|>")


def test_prompt_two_images_and_history():
    config = {**STANDARD, "template": "internvl2_5"}
    prompt = ref_build_prompt("Image-1: <image>\nImage-2: <image>\nCompare.", [2, 1], config,
                              history=[("Hello", "Hi there")])
    one, two = ("<img>" + "<IMG_CONTEXT>" * (256 * n) + "</img>" for n in (2, 1))
    assert prompt == (f"<|im_start|>system\n{SYS25}<|im_end|>\n<|im_start|>user\nHello<|im_end|>\n"
                      f"<|im_start|>assistant\nHi there<|im_end|>\n<|im_start|>user\nImage-1: {one}\n"
                      f"Image-2: {two}\nCompare.<|im_end|>\n<|im_start|>assistant\n")
    with pytest.raises(ValueError, match="placeholders"):
        ref_build_prompt("two images, no tags", [1, 1], config)
    with pytest.raises(ValueError, match="template"):
        ref_build_prompt("x", [], {**config, "template": "vicuna"})


# ----------------------------------------------------------------------------------------------
# (6) a tiny random InternVL end to end


@pytest.mark.parametrize("variant", [
    dict(norm_type="rms_norm", qkv_bias=False, qk_normalization=True, ps_version="v1"),  # 6B-style tower
    dict(norm_type="layer_norm", qkv_bias=True, qk_normalization=False, ps_version="v2", select_layer=-2),  # 300M
])
def test_tiny_internvl_end_to_end(tmp_path, variant):
    config = tiny_config("internlm2", **variant)
    ref = load_reference(write_checkpoint(tmp_path / "ckpt", config, random_weights(config, seed=5)))
    assert ref.num_image_token == 4
    gen = torch.Generator().manual_seed(0)
    image_a, image_b = torch.randn(2, 3, 56, 56, generator=gen), torch.randn(2, 3, 56, 56, generator=gen)
    ids = prompt_ids(tiles=2)

    features = ref.extract_feature(image_a)
    assert features.shape == (2, 4, 64)
    logits_a = ref(ids, image_a, IMG_CONTEXT)
    logits_b = ref(ids, image_b, IMG_CONTEXT)
    assert logits_a.shape == (len(ids), 160) and torch.isfinite(logits_a).all()
    first_image_pos = int((ids == IMG_CONTEXT).nonzero()[0])
    # causal: nothing before the image can see it; everything from the image on does
    torch.testing.assert_close(logits_a[:first_image_pos], logits_b[:first_image_pos], atol=0, rtol=0)
    after = (logits_a[first_image_pos:] - logits_b[first_image_pos:]).abs().amax(dim=-1)
    assert (after > 1e-3).all(), after
    # the image rows really are the features
    embeds = ref.embed_inputs(ids, image_a, IMG_CONTEXT)
    torch.testing.assert_close(embeds[ids == IMG_CONTEXT], features.reshape(-1, 64))

    # generation and prompt logprobs agree with forward
    new = ref.greedy_generate(ids, image_a, IMG_CONTEXT, max_new_tokens=5, eos_token_ids=[])
    assert len(new) == 5
    full = ref(torch.cat([ids, torch.tensor(new)]), image_a, IMG_CONTEXT)
    assert full[len(ids) - 1:-1].argmax(-1).tolist() == new
    assert ref.greedy_generate(ids, image_a, IMG_CONTEXT, 5, eos_token_ids=new[1]) == new[:2]
    lp = ref.prompt_logprobs(ids, image_a, IMG_CONTEXT)
    assert lp.shape == (len(ids) - 1,) and (lp <= 0).all()
    torch.testing.assert_close(lp[3], logits_a[3].log_softmax(-1)[ids[4]])

    with pytest.raises(ValueError, match="IMG_CONTEXT"):
        ref(prompt_ids(tiles=1), image_a, IMG_CONTEXT)

    bf16 = load_reference(tmp_path / "ckpt", dtype=torch.bfloat16)
    logits_bf16 = bf16(ids, image_a, IMG_CONTEXT)
    assert logits_bf16.dtype == torch.bfloat16 and torch.isfinite(logits_bf16).all()
    assert (logits_bf16.float() - logits_a).abs().max() < 0.1 * logits_a.abs().max()


def test_load_rejects_missing_and_extra_weights(tmp_path):
    config = tiny_config("internlm2")
    state = random_weights(config)
    missing = dict(state)
    del missing["vision_model.encoder.layers.1.ls2"]
    with pytest.raises(ValueError, match=r"missing weight\(s\): vision_model.encoder.layers.1.ls2"):
        load_reference(write_checkpoint(tmp_path / "a", config, missing))
    extra = {**state, "language_model.model.layers.0.attention.wqkv.bias": torch.zeros(128)}
    with pytest.raises(ValueError, match=r"unexpected weight\(s\): language_model.model.layers.0.attention.wqkv.bias"):
        load_reference(write_checkpoint(tmp_path / "b", config, extra))
    with pytest.raises(ValueError, match="model_type"):
        load_reference(write_checkpoint(tmp_path / "c", {**config, "model_type": "internvl"}, state))


# ----------------------------------------------------------------------------------------------
# the vision side and the whole model against transformers' native InternVL (ps_version v2 only)


def to_transformers_internvl(state: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    H = config["vision_config"]["hidden_size"]
    renames = {"norm1": "layernorm_before", "norm2": "layernorm_after", "ls1": "lambda_1", "ls2": "lambda_2",
               "attn.proj": "attention.projection_layer", "attn.q_norm": "attention.q_norm",
               "attn.k_norm": "attention.k_norm", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
    out = {
        "model.vision_tower.embeddings.cls_token": state["vision_model.embeddings.class_embedding"],
        "model.vision_tower.embeddings.position_embeddings": state["vision_model.embeddings.position_embedding"],
    }
    for name, tensor in state.items():
        if name.startswith("vision_model.embeddings.patch_embedding."):
            out["model.vision_tower.embeddings.patch_embeddings.projection." + name.rsplit(".", 1)[1]] = tensor
        elif name.startswith("vision_model.encoder.layers."):
            i, rest = name.split(".")[3], name.split(".", 4)[4]
            prefix = f"model.vision_tower.encoder.layer.{i}."
            if rest.startswith("attn.qkv."):
                kind = rest.rsplit(".", 1)[1]
                for part, chunk in zip("qkv", tensor.split(H)):
                    out[f"{prefix}attention.{part}_proj.{kind}"] = chunk
            else:
                module, _, kind = rest.rpartition(".")
                out[prefix + (renames[rest] if not module else renames[module] + "." + kind)] = tensor
        elif name.startswith("mlp1."):
            idx, kind = name.split(".")[1:]
            module = {"0": "layer_norm", "1": "linear_1", "3": "linear_2"}[idx]
            out[f"model.multi_modal_projector.{module}.{kind}"] = tensor
        elif name == "language_model.lm_head.weight":
            out["lm_head.weight"] = tensor
        elif name.startswith("language_model.model."):
            out["model.language_model." + name[len("language_model.model."):]] = tensor
    return out


@pytest.mark.parametrize("variant", [
    dict(norm_type="rms_norm", qkv_bias=False, qk_normalization=True, select_layer=-1),
    dict(norm_type="layer_norm", qkv_bias=True, qk_normalization=False, select_layer=-2),
])
def test_whole_model_matches_transformers_internvl(tmp_path, variant):
    from transformers import InternVLConfig, InternVLForConditionalGeneration

    config = tiny_config("qwen2", ps_version="v2", **variant)
    state = random_weights(config, seed=11)
    ref = load_reference(write_checkpoint(tmp_path / "ckpt", config, state))
    v, t = config["vision_config"], config["llm_config"]
    hf_config = InternVLConfig(
        vision_config=dict(hidden_size=v["hidden_size"], num_hidden_layers=v["num_hidden_layers"],
                           num_attention_heads=v["num_attention_heads"], intermediate_size=v["intermediate_size"],
                           image_size=v["image_size"], patch_size=v["patch_size"], norm_type=v["norm_type"],
                           use_qk_norm=v["qk_normalization"], attention_bias=v["qkv_bias"],
                           layer_norm_eps=v["layer_norm_eps"], hidden_act="gelu", use_mean_pooling=True),
        text_config=dict(model_type="qwen2", vocab_size=t["vocab_size"], hidden_size=t["hidden_size"],
                         intermediate_size=t["intermediate_size"], num_hidden_layers=t["num_hidden_layers"],
                         num_attention_heads=t["num_attention_heads"], num_key_value_heads=t["num_key_value_heads"],
                         rms_norm_eps=t["rms_norm_eps"], tie_word_embeddings=False,
                         rope_parameters={"rope_type": "default", "rope_theta": t["rope_theta"]}),
        image_token_id=IMG_CONTEXT, downsample_ratio=0.5, vision_feature_layer=config["select_layer"],
        vision_feature_select_strategy="default", tie_word_embeddings=False,
    )
    hf_config._attn_implementation = "eager"
    hf = InternVLForConditionalGeneration(hf_config).eval()
    hf.load_state_dict(to_transformers_internvl(state, config), strict=True)

    pixels = torch.randn(3, 3, 56, 56, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        hf_features = hf.model.get_image_features(pixel_values=pixels, vision_feature_layer=config["select_layer"],
                                                  vision_feature_select_strategy="default").pooler_output
    torch.testing.assert_close(ref.extract_feature(pixels), hf_features, atol=1e-5, rtol=1e-5)

    ids = prompt_ids(tiles=3)
    with torch.no_grad():
        expected = hf(input_ids=ids[None], pixel_values=pixels).logits[0]
    assert expected.std() > 0.5
    torch.testing.assert_close(ref(ids, pixels, IMG_CONTEXT), expected, atol=1e-5, rtol=1e-5)

    # a tile size the position embedding was not trained for: both resize it bicubically
    big = torch.randn(1, 3, 84, 84, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        hf_big = hf.model.vision_tower(pixel_values=big).last_hidden_state
    torch.testing.assert_close(ref.vision_model.hidden_state(big, -1), hf_big, atol=1e-5, rtol=1e-5)


def test_reference_is_independent_of_vllm_and_the_plugin():
    """An oracle that imported the code it checks would share its bugs: the reference imports torch,
    numpy, PIL, safetensors, the standard library and its own modules only."""
    folder = Path(sys.modules["reference"].__file__).parent
    assert folder == Path(__file__).parent / "reference"
    allowed = {"torch", "numpy", "PIL", "safetensors", *sys.stdlib_module_names}
    modules = sorted(folder.glob("*.py"))
    assert {m.name for m in modules} == {"__init__.py", "internvl.py", "vision.py", "llm.py", "xcomposer2.py"}
    for module in modules:
        for node in ast.walk(ast.parse(module.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [] if node.level else [node.module]  # relative: a sibling in the package
            else:
                continue
            for name in names:
                assert name.split(".")[0] in allowed, f"{module.name} imports {name}"

