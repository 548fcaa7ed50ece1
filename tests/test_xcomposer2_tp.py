"""Tensor parallel 2 on CPU (two workers, a core each, VLLM_CPU_OMP_THREADS_BIND="0|1") for the tiny
XComposer2 VL-1.8B and 4KHD layouts: every decoder linear and its Partial-LoRA sharded as spec §9.3
(wqkv's Plora_B through the fused QKV loader, wo/w2's Plora_A along its input and reduced); an image
prompt gives the reference's greedy tokens and prompt logprobs (the TP=1 engine matches the same
reference in test_xcomposer2_engine.py). Runs in a subprocess: vLLM's multi-process mode."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import random_image
from reference.xcomposer2 import IMAGE_TOKEN, PLACEHOLDER, load_xcomposer2_reference, ref_build_ids

LOGPROB_ATOL = 1e-4
MAX_TOKENS = 8

TP_SCRIPT = """
import json, sys
from PIL import Image
from vllm import LLM, SamplingParams
llm = LLM(model=sys.argv[1], dtype="float32", tensor_parallel_size=2, max_model_len=1024, enforce_eager=True,
          seed=0, limit_mm_per_prompt={"image": 1})
out = llm.generate([{"prompt": sys.argv[2], "multi_modal_data": {"image": Image.open(sys.argv[3])}}],
                   SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, prompt_logprobs=0), use_tqdm=False)[0]
logprobs = [d[t].logprob for d, t in zip(out.prompt_logprobs[1:], out.prompt_token_ids[1:])]
print("RESULT " + json.dumps({"ids": list(out.prompt_token_ids), "tokens": list(out.outputs[0].token_ids),
                              "logprobs": logprobs}))
"""


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["xcomposer2-vl-1.8b", "xcomposer2-4khd"])
def test_tensor_parallel_2_matches_the_reference(tiny_model, tmp_path, layout):
    from transformers import AutoTokenizer

    from internvl_plugin.configs import register_configs

    path = tiny_model(layout)
    image = random_image(150, 100, 6)
    image.save(tmp_path / "image.png")
    prompt = f"{PLACEHOLDER}Describe the image in detail."
    env = {**os.environ, "VLLM_CPU_OMP_THREADS_BIND": "0|1"}
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
    proc = subprocess.run([sys.executable, "-c", TP_SCRIPT, str(path), prompt, str(tmp_path / "image.png")],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert lines, proc.stderr[-3000:]
    got = json.loads(lines[-1][len("RESULT "):])
    assert "Worker_TP1" in proc.stdout + proc.stderr  # two workers really ran

    register_configs()
    tok = AutoTokenizer.from_pretrained(str(path))
    ref = load_xcomposer2_reference(path)
    ref.image_token_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    ids = ref_build_ids(tok, prompt, [ref.num_image_tokens(ref.preprocess(image)[1])], ref.image_token_id)
    assert got["ids"] == ids
    assert got["tokens"] == ref.greedy_generate(ids, [image], MAX_TOKENS)
    diff = (torch.tensor(got["logprobs"]) - ref.prompt_logprobs(ids, [image])).abs().max().item()
    print(f"TP=2 {layout}: max |dlogprob| = {diff:.2e}")
    assert diff < LOGPROB_ATOL
