"""Invariant 1 through vLLM: a tiny XComposer2 checkpoint stripped of its vision tower, projector and every
Plora tensor, declared as plain InternLM2, runs on vLLM's own InternLM2ForCausalLM (the plugin must leave
plain InternLM2 checkpoints to it) and gives the XComposer2 reference's text-only tokens and prompt
logprobs; on an image prompt's text prefix it gives the logprobs the reference gives before the first
image with the Plora weights in place (invariant 2, prefix isolation, engine side)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_llm, random_image, release_llm
from reference.xcomposer2 import IMAGE_TOKEN, PLACEHOLDER, load_xcomposer2_reference, ref_build_ids
from safetensors.torch import load_file, save_file

LOGPROB_ATOL = 1e-4
MAX_TOKENS = 8


def strip_to_internlm2(src, dst):
    config = json.loads((src / "config.json").read_text())
    for key in ("auto_map", "img_size", "max_length", "vit_config"):
        config.pop(key, None)
    config.update(architectures=["InternLM2ForCausalLM"], model_type="internlm2")
    dst.mkdir()
    (dst / "config.json").write_text(json.dumps(config))
    for f in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
        (dst / f).write_bytes((src / f).read_bytes())
    state = load_file(str(src / "model.safetensors"))
    kept = {k: v for k, v in state.items() if k.startswith(("model.", "output.")) and "Plora" not in k}
    assert len(kept) < len(state)
    save_file(kept, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


@pytest.fixture(scope="module")
def stock(tiny_model, tmp_path_factory, monkeypatch_module):
    monkeypatch_module.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    src = tiny_model("xcomposer2-vl-1.8b")
    path = strip_to_internlm2(src, tmp_path_factory.mktemp("stripped") / "internlm2")
    llm = make_llm(path, limit_mm_per_prompt=None)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(src))
    ref = load_xcomposer2_reference(src)
    ref.image_token_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    yield llm, ref, tok
    release_llm(llm)


def _logprobs(out, ids):
    return torch.tensor([next(iter(d.values())).logprob if len(d) == 1 else d[t].logprob
                         for d, t in zip(out.prompt_logprobs[1:], ids[1:])])


def test_stock_internlm2_class_is_used(stock):
    llm, _, _ = stock
    from vllm.model_executor.models.internlm2 import InternLM2ForCausalLM

    classes = llm.llm_engine.model_config.architectures
    assert classes == ["InternLM2ForCausalLM"]
    model = llm.llm_engine.model_executor.driver_worker.worker.model_runner.model
    assert type(model) is InternLM2ForCausalLM


def test_text_only_equals_stock_internlm2(stock):
    from vllm import SamplingParams

    llm, ref, tok = stock
    prompt = "A plain text prompt without any image at all, about the weather."
    out = llm.generate({"prompt": prompt}, SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True,
                                                         prompt_logprobs=0), use_tqdm=False)[0]
    ids = tok(prompt).input_ids
    assert list(out.prompt_token_ids) == ids
    assert list(out.outputs[0].token_ids) == ref.greedy_generate(ids, [], MAX_TOKENS)
    assert (_logprobs(out, ids) - ref.prompt_logprobs(ids, [])).abs().max() < LOGPROB_ATOL


def test_prefix_before_image_is_independent_of_plora(stock):
    from vllm import SamplingParams

    llm, ref, tok = stock
    image = random_image(120, 90, 1)
    text = "Some text before the picture, long enough to matter: "
    count = ref.num_image_tokens(ref.preprocess(image)[1])
    ids = ref_build_ids(tok, f"{text}{PLACEHOLDER} and after it.", [count], ref.image_token_id)
    first = ids.index(ref.image_token_id)
    with_image = ref.prompt_logprobs(ids, [image])[: first - 1]
    out = llm.generate({"prompt_token_ids": ids[:first]},
                       SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0), use_tqdm=False)[0]
    assert (_logprobs(out, ids[:first]) - with_image).abs().max() < LOGPROB_ATOL
