"""Tiny Mini-InternVL-Chat-4B-V1-5 (Phi-3) and InternVL2-40B (Llama, Yi tokenizer) through vLLM on CPU.

Held against the plain-PyTorch reference (tests/reference, its Phi-3 and Llama decoders checked against
transformers in test_reference_backbones.py) on the same weights, float32 both sides: prompt token ids
identical, greedy tokens identical, prompt logprobs within LOGPROB_ATOL (the suite's tolerance), with
0, 1 and 2 images through LLM.generate and LLM.chat. Then each layout RTN-quantized to AWQ W4A16
(tests/quant_helpers.py) loads through ``awq_w4a16`` and gives the dequantized reference's tokens.
"""

from __future__ import annotations

import pytest
import torch
from conftest import make_llm, random_image, release_llm
from reference import (IMG_CONTEXT_TOKEN, load_reference, ref_build_prompt, ref_load_image,
                       ref_num_image_token_per_tile, ref_num_image_tokens)

LOGPROB_ATOL = 1e-4  # as tests/test_internvl_engine.py: float32 on both sides
MAX_TOKENS = 8
LAYOUTS = ("mini-internvl-4b", "internvl2-40b")
IMAGES = [random_image(640, 320, 1), random_image(448, 448, 2)]  # 2 tiles + thumbnail, 1 tile: 1024 image tokens
# group size 64 divides every decoder linear of both layouts (Phi-3's hidden size is 192)
AWQ_CASES = [("mini-internvl-4b", "lmdeploy", 64), ("internvl2-40b", "ours", 32)]


@pytest.fixture(scope="module", params=LAYOUTS)
def engine(request, tiny_model, monkeypatch_module):
    from transformers import AutoTokenizer

    monkeypatch_module.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    path = tiny_model(request.param)
    llm = make_llm(path)
    tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)  # not vLLM's copy
    yield request.param, llm, load_reference(path), tok, tok.convert_tokens_to_ids(IMG_CONTEXT_TOKEN)
    release_llm(llm)


def _sampling():
    from vllm import SamplingParams
    return SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True, prompt_logprobs=0)


def _expand(prompt, images, config):
    per_tile = ref_num_image_token_per_tile(config)
    for im in images:
        n = ref_num_image_tokens(im.width, im.height, None, config)
        assert n % per_tile == 0
        prompt = prompt.replace("<image>", "<img>" + IMG_CONTEXT_TOKEN * n + "</img>", 1)
    return prompt


def check_against_reference(out, model, ids, images, ctx_id):
    pixel_values = torch.cat([ref_load_image(im, None, model.config) for im in images]) if images else None
    assert list(out.prompt_token_ids) == ids, "prompt expansion/tokenization differs from the reference"
    assert ids.count(ctx_id) == sum(ref_num_image_tokens(i.width, i.height, None, model.config) for i in images)
    assert list(out.outputs[0].token_ids) == model.greedy_generate(ids, pixel_values, ctx_id, MAX_TOKENS, None)
    ref_lp = model.prompt_logprobs(ids, pixel_values, ctx_id)
    got = torch.tensor([d[t].logprob for d, t in zip(out.prompt_logprobs[1:], ids[1:])])
    diff = (got - ref_lp).abs().max().item()
    print(f"[{len(ids)} prompt tokens, {len(images)} images] max |dlogprob| = {diff:.2e}")
    assert diff < LOGPROB_ATOL, f"max |dlogprob| {diff:.2e}"


@pytest.mark.parametrize("n_images", [0, 1, 2])
def test_generate_matches_reference(engine, n_images):
    _, llm, model, tok, ctx_id = engine
    images = IMAGES[:n_images]
    prompt = ("<image>\n" if n_images == 1 else "".join(f"Image-{i + 1}: <image>\n" for i in range(n_images))) \
        + "Describe the image in detail."
    request = {"prompt": prompt}
    if images:
        request["multi_modal_data"] = {"image": images if n_images > 1 else images[0]}
    out = llm.generate(request, _sampling(), use_tqdm=False)[0]
    check_against_reference(out, model, tok(_expand(prompt, images, model.config)).input_ids, images, ctx_id)


@pytest.mark.parametrize("n_images", [0, 1, 2])
def test_chat_matches_reference(engine, n_images):
    _, llm, model, tok, ctx_id = engine
    images = IMAGES[:n_images]
    content = [{"type": "image_pil", "image_pil": im} for im in images] + [{"type": "text", "text": "What is in this picture?"}]
    out = llm.chat([{"role": "user", "content": content}], _sampling(), use_tqdm=False)[0]
    # one image: "<image>\n" before the text, as InternVL's chat() writes it; more: "Image-1: <image>\n..." as
    # InternVL's multi-image prompts number them
    question = ("<image>\n" if len(images) == 1 else "".join(f"Image-{i + 1}: <image>\n" for i in range(len(images)))) \
        + "What is in this picture?"
    num_patches = [ref_load_image(im, None, model.config).shape[0] for im in images]
    check_against_reference(out, model, tok(ref_build_prompt(question, num_patches, model.config)).input_ids,
                            images, ctx_id)


# ---------------------------------------------------------------------------- W4A16


@pytest.fixture(scope="module", params=AWQ_CASES, ids=["-".join(map(str, c)) for c in AWQ_CASES])
def awq_engine(request, awq_model, monkeypatch_module):
    from transformers import AutoTokenizer

    monkeypatch_module.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    quant, dense = awq_model(*request.param)
    llm = make_llm(quant, limit_mm_per_prompt={"image": 1})  # no --quantization: the checkpoint decides
    tok = AutoTokenizer.from_pretrained(str(quant), trust_remote_code=False)
    yield llm, load_reference(dense), tok, tok.convert_tokens_to_ids(IMG_CONTEXT_TOKEN)
    release_llm(llm)


def _decoder_linear_methods(model):
    """{name: quant method class} of the language model's decoder linears (runs in the worker)."""
    from vllm.model_executor.layers.linear import LinearBase

    return {name: type(m.quant_method).__name__ for name, m in model.named_modules()
            if isinstance(m, LinearBase) and name.startswith("language_model.model.layers.")}


def test_awq_matches_dequantized_reference(awq_engine):
    llm, model, tok, ctx_id = awq_engine
    (methods,) = llm.apply_model(_decoder_linear_methods)
    # 2 layers x (qkv, o, gate_up, down): Phi-3's fused checkpoint tensors and Llama's separate ones alike
    assert len(methods) == 8 and set(methods.values()) == {"AWQW4A16LinearMethod"}, methods
    prompt = "<image>\nDescribe the image in detail."
    out = llm.generate({"prompt": prompt, "multi_modal_data": {"image": IMAGES[0]}}, _sampling(), use_tqdm=False)[0]
    check_against_reference(out, model, tok(_expand(prompt, IMAGES[:1], model.config)).input_ids, IMAGES[:1], ctx_id)
