"""Calibration and evaluation text: LMDeploy's named datasets (through the ``datasets`` library, so
``HF_ENDPOINT`` mirrors and the local cache work) or a local ``.txt`` / ``.jsonl`` file, cut into token windows.

Sampling follows LMDeploy (spec internvl-and-quant.md B1.3), seeded with 0: wikitext2, ptb and local files are
tokenized whole (joined with blank lines) and ``n`` random windows of ``seqlen`` tokens are drawn; c4 picks random
documents until one is long enough and takes a random window of it; pileval keeps lines of at most 512 tokens,
concatenates them and cuts blocks. Evaluation takes consecutive non-overlapping windows of the test split.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["NAMED_DATASETS", "CalibrationError", "calibration_ids", "evaluation_ids", "load_texts"]


class CalibrationError(ValueError):
    """Unknown name, unreadable file, too little text, or a dataset that cannot be loaded (offline)."""


@dataclass(frozen=True)
class NamedDataset:
    path: str
    name: str | None
    field: str
    calib_split: str
    eval_split: str
    data_files: str | None = None
    sampling: str = "windows"      # "windows", "documents" (c4) or "blocks" (pileval)


NAMED_DATASETS: dict[str, NamedDataset] = {
    "wikitext2": NamedDataset("Salesforce/wikitext", "wikitext-2-raw-v1", "text", "train", "test"),
    "ptb": NamedDataset("ptb-text-only/ptb_text_only", "penn_treebank", "sentence", "train", "test"),
    "c4": NamedDataset("allenai/c4", None, "text", "train", "validation",
                       data_files="en/c4-train.00000-of-01024.json.gz", sampling="documents"),
    "pileval": NamedDataset("mit-han-lab/pile-val-backup", None, "text", "validation", "validation",
                            sampling="blocks"),
}
PILEVAL_MAX_LINE_TOKENS = 512


def load_texts(source: str, *, split: str = "calib") -> tuple[list[str], NamedDataset | None]:
    """The documents of a named dataset's calibration/eval split, or of a local .txt (one document) / .jsonl
    (the "text" field of each line)."""
    path = Path(source)
    if source.endswith((".txt", ".jsonl")) or path.exists():
        return _local_texts(path), None
    spec = NAMED_DATASETS.get(source.lower())
    if spec is None:
        raise CalibrationError(f"unknown dataset {source!r}: use one of {', '.join(NAMED_DATASETS)} "
                               "or a local .txt / .jsonl file")
    try:
        import datasets
    except ImportError:
        raise CalibrationError(f"dataset {source!r} needs the 'datasets' library: pip install 'vllm-internvl[quantize]'"
                               " (or pass a local .txt / .jsonl file)") from None
    which = spec.calib_split if split == "calib" else spec.eval_split
    try:
        datasets.logging.set_verbosity_error()
        data = datasets.load_dataset(spec.path, spec.name, split=which,
                                     **({"data_files": {which: spec.data_files}} if spec.data_files else {}))
        texts = [str(t) for t in data[spec.field]]
    except Exception as exc:  # noqa: BLE001 - datasets raises many kinds; the user needs one line
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise CalibrationError(f"dataset {source!r} ({spec.path}) cannot be loaded: {first[:200]}; offline, pass a "
                               "local .txt or .jsonl file instead (or set HF_ENDPOINT to a reachable mirror)") from None
    return texts, spec


def _local_texts(path: Path) -> list[str]:
    if not path.is_file():
        raise CalibrationError(f"{path}: no such file (give a .txt, a .jsonl or one of {', '.join(NAMED_DATASETS)})")
    try:
        raw = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise CalibrationError(f"{path}: not UTF-8 text") from None
    if path.suffix == ".jsonl":
        texts = []
        for lineno, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                texts.append(str(json.loads(line)["text"]))
            except (ValueError, KeyError, TypeError):
                raise CalibrationError(f"{path}:{lineno}: not a JSON object with a \"text\" field") from None
        return texts
    return [raw]


def calibration_ids(source: str, tokenizer, n_samples: int, seqlen: int, seed: int = 0) -> torch.Tensor:
    """[n, seqlen] int64 token ids for calibration (module docstring)."""
    texts, spec = load_texts(source, split="calib")
    rng = random.Random(seed)
    sampling = spec.sampling if spec else "windows"
    if sampling == "documents":
        windows = []
        for _ in range(n_samples):
            for _attempt in range(10 * len(texts) + 1):
                ids = tokenizer(texts[rng.randint(0, len(texts) - 1)])["input_ids"]
                if len(ids) >= seqlen:
                    break
            else:
                raise CalibrationError(f"{source}: no document has {seqlen} tokens; lower --calib-seqlen")
            start = rng.randint(0, len(ids) - seqlen)
            windows.append(ids[start:start + seqlen])
        return torch.tensor(windows, dtype=torch.int64)
    if sampling == "blocks":
        rng.shuffle(texts)
        ids: list[int] = []
        for text in texts:
            line = tokenizer(text.strip())["input_ids"]
            if 0 < len(line) <= PILEVAL_MAX_LINE_TOKENS:
                ids.extend(line)
            if len(ids) >= n_samples * seqlen:
                break
        blocks = len(ids) // seqlen
        if blocks == 0:
            raise CalibrationError(f"{source}: fewer than {seqlen} tokens; lower --calib-seqlen")
        return torch.tensor(ids[: min(blocks, n_samples) * seqlen], dtype=torch.int64).view(-1, seqlen)
    ids = tokenizer("\n\n".join(texts))["input_ids"]
    if len(ids) <= seqlen:
        raise CalibrationError(f"{source}: {len(ids)} tokens, not more than --calib-seqlen {seqlen}; "
                               "give more text or a smaller --calib-seqlen")
    starts = [rng.randint(0, len(ids) - seqlen - 1) for _ in range(n_samples)]
    return torch.tensor([ids[s:s + seqlen] for s in starts], dtype=torch.int64)


def evaluation_ids(source: str, tokenizer, seqlen: int, max_samples: int | None = None) -> list[list[int]]:
    """Consecutive non-overlapping windows of ``seqlen`` tokens of the evaluation split (or the whole file)."""
    texts, _ = load_texts(source, split="eval")
    ids = tokenizer("\n\n".join(texts))["input_ids"]
    windows = [ids[i:i + seqlen] for i in range(0, len(ids) - seqlen + 1, seqlen)]
    if not windows:
        raise CalibrationError(f"{source}: {len(ids)} tokens, fewer than --seqlen {seqlen}")
    return windows[:max_samples] if max_samples else windows
