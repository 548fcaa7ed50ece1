"""AWQ (W4A16) XComposer2 through vLLM's awq_w4a16 method: the five decoder linears 4-bit, their Partial-LoRA
16-bit. The tiny VL-1.8B and 4KHD checkpoints are RTN-quantized in the test (tests/quant_helpers.py, which
packs with internvl_kernels.quantize_awq); the oracle is the XComposer2 reference on the dequantized
weights. float32 engines (PyTorch's int4pack dequantizes exactly): greedy tokens equal, prompt logprobs
within LOGPROB_ATOL, for an image prompt and a text prompt."""

from __future__ import annotations

import pytest
import torch
from conftest import make_llm, random_image, release_llm
from reference.xcomposer2 import IMAGE_TOKEN, PLACEHOLDER, load_xcomposer2_reference, ref_build_ids
from safetensors.torch import load_file

LOGPROB_ATOL = 1e-4
MAX_TOKENS = 8
CASES = [("xcomposer2-vl-1.8b", "ours", 64), ("xcomposer2-4khd", "lmdeploy", 32)]
# the 4KHD/LMDeploy case is a second engine: outside the default CI budget (-m "not slow")
PARAMS = [pytest.param(c, id="-".join(map(str, c)), marks=[pytest.mark.slow] if c[0] == "xcomposer2-4khd" else [])
          for c in CASES]


@pytest.fixture(scope="module", params=PARAMS)
def awq_engine(request, awq_model, monkeypatch_module):
    monkeypatch_module.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    layout, producer, group = request.param
    quant, dense = awq_model(layout, producer, group)
    llm = make_llm(quant)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(quant))
    ref = load_xcomposer2_reference(dense)
    ref.image_token_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    yield quant, llm, ref, tok
    release_llm(llm)


def test_checkpoint_keeps_plora_16bit(awq_engine):
    quant, llm, _, _ = awq_engine
    state = load_file(str(quant / "model.safetensors"))
    assert "model.layers.0.attention.wqkv.qweight" in state and "model.layers.0.attention.wqkv.weight" not in state
    for name in ("attention.wqkv", "attention.wo", "feed_forward.w1", "feed_forward.w3", "feed_forward.w2"):
        assert state[f"model.layers.1.{name}.Plora_A.weight"].dtype in (torch.float16, torch.bfloat16)
    assert llm.llm_engine.model_config.quantization == "awq_w4a16"


@pytest.mark.parametrize("with_image", [False, True])
def test_awq_matches_dequantized_reference(awq_engine, with_image):
    from vllm import SamplingParams

    _, llm, ref, tok = awq_engine
    image = random_image(150, 100, 3)
    prompt = (f"{PLACEHOLDER}" if with_image else "") + "Describe the image in detail, then the weather."
    request = {"prompt": prompt, **({"multi_modal_data": {"image": image}} if with_image else {})}
    out = llm.generate(request, SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True,
                                               prompt_logprobs=0), use_tqdm=False)[0]
    images = [image] if with_image else []
    counts = [ref.num_image_tokens(ref.preprocess(image)[1])] if with_image else []
    ids = ref_build_ids(tok, prompt, counts, ref.image_token_id)
    assert list(out.prompt_token_ids) == ids
    assert list(out.outputs[0].token_ids) == ref.greedy_generate(ids, images, MAX_TOKENS)
    got = torch.tensor([next(iter(d.values())).logprob if len(d) == 1 else d[t].logprob
                        for d, t in zip(out.prompt_logprobs[1:], ids[1:])])
    diff = (got - ref.prompt_logprobs(ids, images)).abs().max().item()
    print(f"max |dlogprob| = {diff:.2e}")
    assert diff < LOGPROB_ATOL
