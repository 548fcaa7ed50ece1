"""Tiny InternVL (three layouts) through vLLM on CPU vs the plain-PyTorch reference.

Both run in float32 on the same bf16-stored weights. Checked: prompt token ids identical (the
prompt expansion and tokenization), greedy tokens identical, prompt logprobs within
LOGPROB_ATOL, image token counts, per-request max_dynamic_patch.
"""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from reference import (IMG_CONTEXT_TOKEN, load_reference, ref_build_prompt, ref_load_image,
                       ref_num_image_token_per_tile, ref_num_image_tokens)

LOGPROB_ATOL = 1e-4  # float32 on both sides; measured max 1.4e-5 (vLLM CPU kernels sum in another order)
MAX_TOKENS = 8


def _image(w, h, seed):
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray(torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8).numpy())


IMAGES = [_image(640, 480, 1), _image(300, 900, 2)]


@pytest.fixture(scope="module")
def ref(vl_engine):
    layout, path, llm = vl_engine
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)  # not vLLM's copy
    return load_reference(path), tok, tok.convert_tokens_to_ids(IMG_CONTEXT_TOKEN)


def _sampling(**kw):
    from vllm import SamplingParams
    return SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True, prompt_logprobs=0, **kw)


def _compare(out, reference, ids, images, ctx_id, max_num=None):
    model = reference
    pixel_values = torch.cat([ref_load_image(im, max_num, model.config) for im in images]) if images else None
    assert list(out.prompt_token_ids) == ids, "prompt expansion/tokenization differs from the reference"
    expected = model.greedy_generate(ids, pixel_values, ctx_id, MAX_TOKENS, None)
    assert list(out.outputs[0].token_ids) == expected
    ref_lp = model.prompt_logprobs(ids, pixel_values, ctx_id)
    got = torch.tensor([next(iter(d.values())).logprob if len(d) == 1 else d[t].logprob
                        for d, t in zip(out.prompt_logprobs[1:], ids[1:])])
    diff = (got - ref_lp).abs()
    print(f"[{len(ids)} prompt tokens, {len(images)} images] max |dlogprob| = {diff.max().item():.2e}")
    assert diff.max().item() < LOGPROB_ATOL, f"max |dlogprob| {diff.max().item():.2e}"
    return diff


def _expand_raw(prompt, images, config, max_num=None):
    per_tile = ref_num_image_token_per_tile(config)
    for im in images:
        tiles = ref_num_image_tokens(im.width, im.height, max_num, config) // per_tile
        prompt = prompt.replace("<image>", "<img>" + IMG_CONTEXT_TOKEN * (per_tile * tiles) + "</img>", 1)
    return prompt


@pytest.mark.parametrize("n_images", [0, 1, 2])
def test_generate_matches_reference(vl_engine, ref, n_images):
    _, _, llm = vl_engine
    reference, tok, ctx_id = ref
    images = IMAGES[:n_images]
    prompt = "".join(f"Image-{i + 1}: <image>\n" for i in range(n_images)) + "Describe the image in detail."
    request = {"prompt": prompt}
    if images:
        request["multi_modal_data"] = {"image": images if n_images > 1 else images[0]}
    out = llm.generate(request, _sampling(), use_tqdm=False)[0]
    ids = tok(_expand_raw(prompt, images, reference.config)).input_ids
    assert ids.count(ctx_id) == sum(ref_num_image_tokens(i.width, i.height, None, reference.config) for i in images)
    _compare(out, reference, ids, images, ctx_id)


@pytest.mark.parametrize("n_images", [0, 1, 2])
def test_chat_matches_reference(vl_engine, ref, n_images):
    _, _, llm = vl_engine
    reference, tok, ctx_id = ref
    images = IMAGES[:n_images]
    content = [{"type": "image_pil", "image_pil": im} for im in images] + [{"type": "text", "text": "What is in this picture?"}]
    out = llm.chat([{"role": "user", "content": content}], _sampling(), use_tqdm=False)[0]
    # one image: "<image>\n" before the text, as InternVL's chat() writes it; more: "Image-1: <image>\n..." as
    # InternVL's multi-image prompts number them
    question = ("<image>\n" if len(images) == 1 else "".join(f"Image-{i + 1}: <image>\n" for i in range(len(images)))) \
        + "What is in this picture?"
    num_patches = [ref_load_image(im, None, reference.config).shape[0] for im in images]
    prompt = ref_build_prompt(question, num_patches, reference.config)
    ids = tok(prompt).input_ids
    _compare(out, reference, ids, images, ctx_id)


def test_per_request_max_dynamic_patch(vl_engine, ref):
    _, _, llm = vl_engine
    reference, tok, ctx_id = ref
    image = _image(1920, 1080, 3)
    counts = {}
    for max_num in (1, 6, 12):
        out = llm.generate({"prompt": "<image>\nDescribe.", "multi_modal_data": {"image": image},
                            "mm_processor_kwargs": {"max_dynamic_patch": max_num}}, _sampling(), use_tqdm=False)[0]
        counts[max_num] = list(out.prompt_token_ids).count(ctx_id)
        if max_num == 6:  # full check on one setting: the override reaches tiling and the model
            ids = tok(_expand_raw("<image>\nDescribe.", [image], reference.config, max_num)).input_ids
            _compare(out, reference, ids, [image], ctx_id, max_num=max_num)
    assert counts == {1: 256, 6: 768, 12: 2304}


def test_bad_processor_kwargs_are_rejected(vl_engine):
    _, _, llm = vl_engine
    with pytest.raises(Exception, match="max_dynamic_patch"):
        llm.generate({"prompt": "<image>\nx", "multi_modal_data": {"image": IMAGES[0]},
                      "mm_processor_kwargs": {"max_dynamic_patch": "many"}}, _sampling(), use_tqdm=False)
    # the engine still serves afterwards
    out = llm.generate({"prompt": "hello"}, _sampling(), use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) == MAX_TOKENS
