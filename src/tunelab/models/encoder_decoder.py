"""Encoder-decoder models for task seq2seq: any `AutoModelForSeq2SeqLM` checkpoint as it is, or a bert2bert
`EncoderDecoderModel` built from an encoder-only checkpoint (BERT, minilm) — the same weights as encoder and as
decoder, with new (untrained) cross-attention — so the path can be exercised with the packaged `minilm`."""
from __future__ import annotations

from ..errors import DataError


def is_seq2seq_checkpoint(directory: str) -> bool:
    from transformers import AutoConfig

    return bool(getattr(AutoConfig.from_pretrained(directory), "is_encoder_decoder", False))


def build_model(directory: str, **load_kwargs):
    """Tokenizer, model, and the modules the checkpoint did not contain (trained by every method)."""
    import torch
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
