"""Run a tiny InternVL through vLLM in its default multi-process mode and report, as JSON, which
class each worker built and in which process. Used by tests/test_plugin.py (spawn needs a real
script with a __main__ guard)."""

import json
import os
import sys

from probe_funcs import describe  # importable by name in the workers (PYTHONPATH)



if __name__ == "__main__":
    # apply_model ships `describe` to the worker by pickle; this test-only script is the one place
    # that allows it (vLLM refuses pickled callables by default).
    os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"
    from PIL import Image
    from vllm import LLM, SamplingParams

    llm = LLM(model=sys.argv[1], dtype="bfloat16", max_model_len=2048, enforce_eager=True,
              gpu_memory_utilization=0.2, max_num_seqs=2, limit_mm_per_prompt={"image": 1})
    out = llm.generate({"prompt": "<image>\nDescribe.", "multi_modal_data": {"image": Image.new("RGB", (448, 448))}},
                       SamplingParams(max_tokens=4, temperature=0, ignore_eos=True), use_tqdm=False)[0]
    print("PROBE " + json.dumps({"front_pid": os.getpid(), "workers": llm.apply_model(describe),
                                 "trust_remote_code": llm.llm_engine.model_config.trust_remote_code,
                                 "tokens": list(out.outputs[0].token_ids),
                                 "prompt_len": len(out.prompt_token_ids)}))
