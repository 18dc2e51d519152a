"""`seq2seq`: instruction data on an encoder-decoder model (T5 style): the prompt goes into the encoder, the
response is the decoder's target.

Any `AutoModelForSeq2SeqLM` checkpoint (t5-small, flan-t5, bart) loads as it is. An encoder-only checkpoint
(BERT, minilm) becomes a bert2bert `EncoderDecoderModel` — the same weights as encoder and as decoder, with new
(untrained) cross-attention — so the path can be exercised with the packaged `minilm`.
Prompts use the `plain` format by default (the instruction, then the input), or `alpaca` / `template`.
"""
from __future__ import annotations

import torch

from ..errors import DataError
from . import sft


def is_seq2seq_checkpoint(directory: str) -> bool:
    from transformers import AutoConfig

    return bool(getattr(AutoConfig.from_pretrained(directory), "is_encoder_decoder", False))


def load_model(directory: str, **load_kwargs):
    """Tokenizer, model, and the modules the checkpoint did not contain (trained by every method)."""
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer, EncoderDecoderModel
    from transformers.utils import logging as hf_logging

    tokenizer = AutoTokenizer.from_pretrained(directory)
    kwargs = {"dtype": torch.float32, **load_kwargs}
    if is_seq2seq_checkpoint(directory):
        return tokenizer, AutoModelForSeq2SeqLM.from_pretrained(directory, **kwargs), []
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the new cross-attention is reported below, in one line
    try:
        encoder = AutoModel.from_pretrained(directory, **kwargs)
        decoder, info = AutoModelForCausalLM.from_pretrained(directory, is_decoder=True, add_cross_attention=True,
                                                             output_loading_info=True, **kwargs)
    finally:
        hf_logging.set_verbosity(verbosity)
    model = EncoderDecoderModel(encoder=encoder, decoder=decoder)
    start = tokenizer.cls_token_id if tokenizer.cls_token_id is not None else tokenizer.bos_token_id
    end = tokenizer.sep_token_id if tokenizer.sep_token_id is not None else tokenizer.eos_token_id
    if start is None or end is None or tokenizer.pad_token_id is None:
        raise DataError(f"{directory}: the tokenizer needs start, end and pad tokens to build an encoder-decoder")
    model.config.decoder_start_token_id, model.config.eos_token_id = start, end
    model.config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.decoder_start_token_id = start
    model.generation_config.eos_token_id, model.generation_config.pad_token_id = end, tokenizer.pad_token_id
    new = sorted({"decoder." + k.rsplit(".", 1)[0] for k in info["missing_keys"]})
    print(f"tunelab: {directory} is not an encoder-decoder; built bert2bert from it ({len(new)} new modules, "
          f"cross-attention untrained)")
    return tokenizer, model, new


def resolve_prompt_format(data) -> str:
    if data.prompt_format == "chat":
        raise DataError("task seq2seq has no chat template; use prompt_format plain (auto), alpaca or template")
    return "plain" if data.prompt_format == "auto" else data.prompt_format


def encode(convs: list, tokenizer, data, max_length: int) -> sft.EncodedSplit:
    """Rows of encoder `input_ids` and decoder `labels` (the response, ending with the end token)."""
    out = sft.EncodedSplit([])
    for conv in convs:
        conv_data = conv.data or data
        fmt = resolve_prompt_format(conv_data)
        for i in range(len(conv.turns)):
            source = sft.render_prompt(conv, i, tokenizer, fmt, conv_data)
            ids = tokenizer(source, add_special_tokens=True)["input_ids"]
            labels = tokenizer(text_target=conv.turns[i]["response"], add_special_tokens=True)["input_ids"]
            if tokenizer.cls_token_id is not None and labels[:1] == [tokenizer.cls_token_id]:
                labels = labels[1:]  # BERT's [CLS] is the decoder start token, fed in, not predicted
            if len(ids) > max_length or len(labels) > max_length:
                if conv_data.overflow == "drop":
                    out.dropped += 1
                    continue
                out.truncated += 1
                ids, labels = ids[:max_length], labels[:max_length]
            out.rows.append({"input_ids": ids, "labels": labels})
    return out
