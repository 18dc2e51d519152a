"""`qlora`: LoRA on a base model whose weights are loaded in 4-bit (NF4) or 8-bit by bitsandbytes (Dettmers
et al., 2023). PEFT's `prepare_model_for_kbit_training` keeps layer norms in fp32 and turns gradient
checkpointing on.

`check()` runs before any work: it quantizes a small tensor on the device that will train, so a bitsandbytes
that cannot quantize there (missing, or no backend for this CPU/GPU) is reported in one sentence. The saved
adapter is a plain PEFT LoRA adapter; tunelab evaluates, generates and merges with it on the full-precision
base (as deployments usually do), so its test metrics are those of the adapter on unquantized weights.
"""
from typing import Literal

from pydantic import model_validator

from . import lora

DEFAULT_LR = 2e-4  # the QLoRA paper's rate for small models
MERGEABLE = True  # merged into the full-precision base


class Options(lora.Options):
    name: Literal["qlora"] = "qlora"
    bits: Literal[4, 8] = 4
    """Precision of the frozen base weights."""
    quant_type: Literal["nf4", "fp4"] = "nf4"
    """4-bit data type: NormalFloat4 (the paper's) or plain FP4."""
    double_quant: bool = True
    """Quantize the quantization constants too (saves ~0.4 bit per weight)."""

    @model_validator(mode="after")
    def _full_precision_inits(self):
        if self.init in ("pissa", "olora"):
            raise ValueError(f"init {self.init} decomposes full-precision weights, which qlora quantizes; use init "
                             f"default or gaussian, or method lora")
        return self


def check(options: Options, **_) -> None:
    """Raise RuntimeError when bitsandbytes cannot quantize to `options.bits` on this machine's device."""
    import torch

    try:
        import bitsandbytes.functional as F
    except ImportError as exc:
        raise RuntimeError(f"method qlora needs bitsandbytes, which is not installed ({exc}); "
                           f"pip install 'tunelab[qlora]'") from None
    device = "cuda" if torch.cuda.is_available() else "cpu"
    probe = torch.randn(64, 64, device=device, dtype=torch.bfloat16)
    try:
        if options.bits == 4:
            packed, state = F.quantize_4bit(probe, quant_type=options.quant_type)
            F.dequantize_4bit(packed, state)
        else:
            F.int8_vectorwise_quant(probe.half())
    except Exception as exc:  # bitsandbytes raises many types for "no kernel here"
        raise RuntimeError(f"method qlora: the installed bitsandbytes cannot quantize to {options.bits}-bit on "
                           f"{device} ({type(exc).__name__}: {str(exc)[:200]}); use method lora, or a machine "
                           f"bitsandbytes supports") from None


def load_kwargs(options: Options) -> dict:
    """Extra `from_pretrained` arguments: the quantization config."""
    import torch
    from transformers import BitsAndBytesConfig

    if options.bits == 8:
        return {"quantization_config": BitsAndBytesConfig(load_in_8bit=True)}
    return {"quantization_config": BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type=options.quant_type, bnb_4bit_use_double_quant=options.double_quant,
        bnb_4bit_compute_dtype=torch.bfloat16)}


def prepare(model, options: Options, new_modules: list[str], **context):
    from peft import prepare_model_for_kbit_training

    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                            gradient_checkpointing_kwargs={"use_reentrant": False})
    return lora.prepare(model, options, new_modules, **context)
