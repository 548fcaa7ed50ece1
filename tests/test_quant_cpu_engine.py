"""The CPU int4 path of awq_w4a16 through real vLLM: tokens and prompt logprobs against the float reference.

Tiny InternVL (InternLM2 and Qwen2 backbones) and text-only InternLM2 checkpoints, RTN-quantized to AWQ in
the layouts of our tools, LMDeploy and AutoAWQ (tests/quant_helpers.py), with group sizes 32/64/128; the
reference is the plain-PyTorch model on the dequantized weights (tests/reference), in float32.

* float32 engines run PyTorch's int4pack kernel, which dequantizes exactly: greedy tokens equal, prompt
  logprobs within LOGPROB_ATOL (the suite's float32 tolerance). tests/test_quant.py covers four more
  (layout, producer, group size) combinations the same way.
* bfloat16 engines run the plan this machine gets, and one case forces int4pack (16-bit activations):
  prompt logprobs within BF16_LOGPROB_ATOL. With 16-bit activations greedy tokens equal over MAX_TOKENS;
  the drift is bfloat16's own (activations, norms, attention with 8-bit mantissas): a dense bfloat16
  engine on the same dequantized weights drifts as much. Measured max |dlogprob| int4pack(+wna16) /
  dense, text and image prompt: internvl2-2b-ours-128 0.066 / 0.066 and 0.158 / 0.158,
  internvl2-1b-autoawq-64 0.064 / 0.044 and 0.108 / 0.105, internlm2-lmdeploy-32 0.063 / 0.063.
  w4a8-amx (the plan on an AMX CPU: int8 activations, as stock vLLM's CPU AWQ) adds the activations'
  8-bit rounding: max |dlogprob| internvl2-2b-ours-128 0.154 text / 0.134 image, internvl2-1b-autoawq-64
  0.117 / 0.158, internlm2-lmdeploy-32 0.123 (int4pack forced, internlm2-autoawq-64: 0.073). The tiny
  random models' next-token margins are often below that, so a greedy token may differ where the
  reference's choice wins by less: each of the engine's tokens must be the reference's choice or within
  2 x BF16_LOGPROB_ATOL of it (teacher forced: the reference scores the engine's sequence), the most
  two logprobs each off by the tolerance can move a choice. Measured: all 8 tokens equal on 3 of the 5
  prompts; internvl2-1b-autoawq-64 text parts after 2 tokens, internlm2-lmdeploy-32 after 6, each at a
  token the reference prefers by 0.062 / 0.086 (its choice's logprob minus the engine's token's).
* tensor parallel 2 (two CPU workers, a core each) gives the tokens and logprobs of the reference too.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_llm, random_image, release_llm

LOGPROB_ATOL = 1e-4
BF16_LOGPROB_ATOL = 0.25  # 1.6x the largest drift measured, W4A16 or dense (docstring)
MAX_TOKENS = 8

# (tiny layout, producer layout, group size, dtype, plan forced or None for the machine's choice)
CASES = [
    ("internlm2", "ours", 128, "float32", None),
    ("internlm2", "lmdeploy", 64, "float32", None),
    ("internvl2-1b", "lmdeploy", 32, "float32", None),
    ("internvl2-2b", "autoawq", 32, "float32", None),
    ("internvl2-2b", "ours", 128, "bfloat16", None),
    ("internvl2-1b", "autoawq", 64, "bfloat16", None),
    ("internlm2", "lmdeploy", 32, "bfloat16", None),
    ("internlm2", "autoawq", 64, "bfloat16", "int4pack"),
]
PROMPT = "Describe the image in detail, then say what the weather is like in it."


IMAGE = random_image(448, 448, 2)


def _id(case):
    return "-".join(str(c) for c in case if c is not None)


ENGINES = [pytest.param(c, id=_id(c)) for c in CASES]
# the image prompt only for the InternVL checkpoints (the InternLM2 ones are text-only)
PROMPTS = [pytest.param(c, with_image, id=_id(c) + ("-image" if with_image else "-text"))
           for c in CASES for with_image in (False, True) if not (with_image and c[0] == "internlm2")]


@pytest.fixture(scope="module")
def engine(request, awq_model, monkeypatch_module):
    """One engine per CASES row (tests parametrize it indirectly), shared by the module's tests."""
    monkeypatch_module.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from internvl_plugin.quant_cpu import ENV_PLAN

    layout, producer, group_size, dtype, plan = request.param
    quant, dense = awq_model(layout, producer, group_size)
    if plan:  # read when the engine loads (in this process) and repacks its layers
        monkeypatch_module.setenv(ENV_PLAN, plan)
    llm = make_llm(quant, dtype=dtype, limit_mm_per_prompt={} if layout == "internlm2" else {"image": 1})
    monkeypatch_module.delenv(ENV_PLAN, raising=False)
    yield request.param, quant, dense, llm
    release_llm(llm)


class TextReference:
    """The reference language model alone (text-only InternLM2 checkpoints), with InternVLReference's API."""

    def __init__(self, folder: Path):
        from safetensors.torch import load_file
        from reference.llm import build_language_model

        config = json.loads((folder / "config.json").read_text())
        with torch.device("meta"):
            self.language_model = build_language_model(config)
        state = {}
        for shard in sorted(folder.glob("*.safetensors")):
            state.update(load_file(str(shard)))
        self.language_model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True, assign=True)

    @torch.no_grad()
    def forward(self, ids, pixel_values=None, ctx_id=None):
        return self.language_model(torch.tensor(ids))

    @torch.no_grad()
    def greedy_generate(self, ids, pixel_values, ctx_id, max_new_tokens, eos=None):
        ids = list(ids)
        for _ in range(max_new_tokens):
            ids.append(int(self.language_model(torch.tensor(ids))[-1].argmax()))
        return ids[-max_new_tokens:]

    @torch.no_grad()
    def prompt_logprobs(self, ids, pixel_values=None, ctx_id=None):
        ids = torch.tensor(ids)
        logprobs = self.language_model(ids).float()[:-1].log_softmax(-1)
        return logprobs.gather(-1, ids[1:, None]).squeeze(-1)


@pytest.fixture(scope="module")
def reference(engine):
    from reference.internvl import IMG_CONTEXT_TOKEN, load_reference
    from transformers import AutoTokenizer

    (layout, *_), quant, dense, _ = engine
    tok = AutoTokenizer.from_pretrained(str(quant), trust_remote_code=False)
    if layout == "internlm2":
        return TextReference(dense), tok, None
    return load_reference(dense), tok, tok.convert_tokens_to_ids(IMG_CONTEXT_TOKEN)


def _sampling():
    from vllm import SamplingParams

    return SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True, prompt_logprobs=0)


def _plans(model):
    return sorted({getattr(m, "cpu_int4_plan", None) for m in model.modules() if hasattr(m, "qweight")
                   or hasattr(m, "cpu_int4_plan")}, key=str)


@pytest.mark.parametrize("engine", ENGINES, indirect=True)
def test_layers_run_the_planned_kernels(engine):
    from internvl_plugin.quant_cpu import choose_plan

    (_, _, group_size, dtype, forced), _, _, llm = engine
    (plans,) = llm.apply_model(_plans)
    expected = forced or choose_plan(128, 256, group_size, getattr(torch, dtype))  # the tiny models' shapes
    assert plans == [expected], plans
    assert expected == "int4pack" or dtype == "bfloat16"


@pytest.mark.parametrize("engine,with_image", PROMPTS, indirect=["engine"], scope="module")
def test_tokens_and_logprobs_match_the_reference(engine, reference, with_image):
    from reference.internvl import IMG_CONTEXT_TOKEN, ref_load_image, ref_num_image_tokens

    case, _, _, llm = engine
    model, tok, ctx_id = reference
    prompt = ("<image>\n" if with_image else "") + PROMPT
    request, pixel_values = {"prompt": prompt}, None
    if with_image:
        request["multi_modal_data"] = {"image": IMAGE}
        pixel_values = ref_load_image(IMAGE, None, model.config)
        n = ref_num_image_tokens(IMAGE.width, IMAGE.height, None, model.config)
        prompt = prompt.replace("<image>", "<img>" + IMG_CONTEXT_TOKEN * n + "</img>", 1)
    ids = tok(prompt).input_ids
    out = llm.generate(request, _sampling(), use_tqdm=False)[0]
    assert list(out.prompt_token_ids) == ids

    ref_lp = model.prompt_logprobs(ids, pixel_values, ctx_id)
    got = torch.tensor([d[t].logprob for d, t in zip(out.prompt_logprobs[1:], ids[1:])])
    diff = (got - ref_lp).abs().max().item()
    print(f"max |dlogprob| {case} image={with_image}: {diff:.2e} over {len(ids)} prompt tokens")
    assert diff < (LOGPROB_ATOL if case[3] == "float32" else BF16_LOGPROB_ATOL), f"max |dlogprob| {diff:.2e}"
    tokens, expected = list(out.outputs[0].token_ids), model.greedy_generate(ids, pixel_values, ctx_id, MAX_TOKENS)
    (plans,) = llm.apply_model(_plans)
    if plans != ["w4a8-amx"]:
        assert tokens == expected
        return
    # 8-bit activations: the reference's margin at each of the engine's choices (module docstring)
    logprobs = model.forward(ids + tokens, pixel_values, ctx_id).float()[len(ids) - 1:-1].log_softmax(-1)
    gaps = logprobs.max(-1).values - logprobs.gather(-1, torch.tensor(tokens)[:, None]).squeeze(-1)
    same = next((i for i, (a, b) in enumerate(zip(tokens, expected)) if a != b), len(tokens))
    print(f"greedy tokens equal to the reference's for {same} of {len(tokens)}; largest margin lost {gaps.max():.3f}")
    assert gaps.max() < 2 * BF16_LOGPROB_ATOL, gaps


# ------------------------------------------------------------------------------------------ tensor parallel


TP_SCRIPT = """
import json, sys
from vllm import LLM, SamplingParams
llm = LLM(model=sys.argv[1], dtype="float32", tensor_parallel_size=2, max_model_len=1024, enforce_eager=True, seed=0)
out = llm.generate([{"prompt_token_ids": json.loads(sys.argv[2])}], SamplingParams(
    max_tokens=8, temperature=0.0, ignore_eos=True, prompt_logprobs=0), use_tqdm=False)[0]
logprobs = [d[t].logprob for d, t in zip(out.prompt_logprobs[1:], out.prompt_token_ids[1:])]
print("RESULT " + json.dumps({"tokens": list(out.outputs[0].token_ids), "logprobs": logprobs}))
"""


@pytest.mark.slow
def test_tensor_parallel_2_matches_the_reference(awq_model, tmp_path):
    """Two CPU workers (one core each): each holds half of every layer, repacked on its own."""
    quant, dense = awq_model("internlm2", "ours", 32)
    ids = [1, 333, 276, 301, 290, 262, 314, 355, 270, 281, 317, 293]
    env = {**os.environ, "VLLM_CPU_OMP_THREADS_BIND": "0|1"}
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
    proc = subprocess.run([sys.executable, "-c", TP_SCRIPT, str(quant), json.dumps(ids)], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert lines, proc.stderr[-3000:]
    got = json.loads(lines[-1][len("RESULT "):])
    log = proc.stdout + proc.stderr
    for rank in (0, 1):  # each worker logs the plan its layers got: float32 -> int4pack
        assert re.search(rf"Worker_TP{rank}.*awq_w4a16 on CPU: int4pack with float32", log), rank
    model = TextReference(dense)
    assert got["tokens"] == model.greedy_generate(ids, None, None, 8)
    diff = (torch.tensor(got["logprobs"]) - model.prompt_logprobs(ids)).abs().max().item()
    assert diff < LOGPROB_ATOL, f"max |dlogprob| {diff:.2e}"
