"""``awq_tools eval``: perplexity of a checkpoint through vLLM's prompt logprobs.

The text is cut into consecutive windows of ``seqlen`` tokens (awq_tools.calib.evaluation_ids, the test split of
a named dataset or a whole local file); each window is one prompt, scored with ``prompt_logprobs=0`` (the
logprob vLLM gives every prompt token after the first). Perplexity = exp(total negative logprob / scored
tokens). With a baseline, both models run on identically configured engines, one after the other, on the same
token ids (the first model's tokenizer), so the 16-bit and the W4A16 figures differ only by the weights.
"""

from __future__ import annotations

import gc
import math
from dataclasses import dataclass
from pathlib import Path

from internvl_plugin.json_files import JsonFileError, read_json_object

__all__ = ["Perplexity", "EvalError", "perplexity_of", "evaluate_models"]


class EvalError(ValueError):
    """A model folder awq_tools eval cannot use: the message is one line naming the file."""


@dataclass(frozen=True)
class Perplexity:
    model: str
    perplexity: float
    nll_sum: float
    tokens: int
    windows: int


def perplexity_of(llm, windows: list[list[int]], label: str = "") -> Perplexity:
    """Perplexity of token windows under an existing vLLM ``LLM``."""
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
    outs = llm.generate([{"prompt_token_ids": ids} for ids in windows], params, use_tqdm=False)
    nll, count = 0.0, 0
    for ids, out in zip(windows, outs):
        for token, entry in zip(ids[1:], out.prompt_logprobs[1:]):
            nll -= entry[token].logprob
            count += 1
    return Perplexity(label, math.exp(nll / count), nll, count, len(windows))


def evaluate_models(models: list[Path], dataset: str, *, seqlen: int = 2048, max_samples: int | None = None,
                    dtype: str = "auto", engine_args: dict | None = None) -> list[Perplexity]:
    """Perplexity of each model in turn on the same windows; engines are built and released one at a time."""
    configs = [_read_config(Path(model)) for model in models]  # every model checked before any engine starts
    from transformers import AutoTokenizer
    from vllm import LLM
    from vllm.distributed import cleanup_dist_env_and_memory

    from awq_tools.calib import evaluation_ids
    from internvl_plugin.configs import register_configs

    register_configs()
    tok = AutoTokenizer.from_pretrained(str(models[0]), trust_remote_code=False)
    windows = evaluation_ids(dataset, tok, seqlen, max_samples)
    results = []
    for model, config in zip(models, configs):
        args = dict(model=str(model), dtype=dtype, max_model_len=seqlen + 1, enforce_eager=True, seed=0)
        if "llm_config" in config:
            args["limit_mm_per_prompt"] = {"image": 0}  # text only: no vision profiling
        args.update(engine_args or {})
        llm = LLM(**args)
        try:
            results.append(perplexity_of(llm, windows, str(model)))
        finally:
            # the engine must be gone before the next one starts: its teardown would take the new one's groups
            del llm
            gc.collect()
            cleanup_dist_env_and_memory()
    return results


def _read_config(model: Path) -> dict:
    try:
        return read_json_object(model / "config.json")
    except JsonFileError as exc:
        raise EvalError(f"{exc} (give a checkpoint folder)" if exc.missing else str(exc)) from None
