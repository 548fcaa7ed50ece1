"""InternLM2's sentencepiece tokenizer, without remote code.

Real InternLM2 / InternVL checkpoints ship ``tokenizer.model`` (sentencepiece; ``<unk>``=0,
``<s>``=1, ``</s>``=2, ChatML tokens as user-defined pieces) and a ``tokenizer_config.json`` whose
``tokenizer_class`` is ``InternLM2Tokenizer`` with an ``auto_map`` into the repo's Python files.
This class has that name, so ``AutoTokenizer`` picks it instead of executing the repo's code.
Behaviour kept from upstream: a BOS is prepended (``add_bos_token=True``), no EOS is appended.
"""

from __future__ import annotations

from transformers.tokenization_utils_sentencepiece import SentencePieceBackend

__all__ = ["InternLM2Tokenizer", "InternLMXComposer2Tokenizer"]


class InternLM2Tokenizer(SentencePieceBackend):
    vocab_files_names = {"vocab_file": "tokenizer.model"}
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(self, vocab_file, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                 pad_token="</s>", add_bos_token=True, add_eos_token=False,
                 clean_up_tokenization_spaces=False, **kwargs):
        self.add_bos_token = add_bos_token
        self.add_eos_token = add_eos_token
        kwargs.pop("special_tokens_pattern", None)
        super().__init__(vocab_file=vocab_file, unk_token=unk_token, bos_token=bos_token,
                         eos_token=eos_token, pad_token=pad_token,
                         clean_up_tokenization_spaces=clean_up_tokenization_spaces,
                         special_tokens_pattern="none", **kwargs)

    def build_inputs_with_special_tokens(self, token_ids_0, token_ids_1=None):
        bos = [self.bos_token_id] if self.add_bos_token else []
        eos = [self.eos_token_id] if self.add_eos_token else []
        out = bos + list(token_ids_0) + eos
        if token_ids_1 is not None:
            out += bos + list(token_ids_1) + eos
        return out

    def get_special_tokens_mask(self, token_ids_0, token_ids_1=None, already_has_special_tokens=False):
        if already_has_special_tokens:
            return super().get_special_tokens_mask(token_ids_0, token_ids_1, True)
        bos = [1] if self.add_bos_token else []
        eos = [1] if self.add_eos_token else []
        mask = bos + [0] * len(token_ids_0) + eos
        if token_ids_1 is not None:
            mask += bos + [0] * len(token_ids_1) + eos
        return mask

    def convert_tokens_to_string(self, tokens):
        # decode runs of ordinary pieces with sentencepiece (handles "▁" and byte pieces);
        # special/added tokens are emitted verbatim
        out, run = [], []
        specials = set(self.all_special_tokens) | set(self.added_tokens_encoder)
        for tok in tokens:
            if tok in specials:
                if run:
                    out.append(self.sp_model.decode(run))
                    run = []
                out.append(tok)
            else:
                run.append(tok)
        if run:
            out.append(self.sp_model.decode(run))
        return "".join(out)


class InternLMXComposer2Tokenizer(InternLM2Tokenizer):
    """The name XComposer2's ``tokenizer_config.json`` gives the same sentencepiece tokenizer."""
