"""Tiny random models of every supported family, built from configs (no downloads)."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    # Triton kernels run on the CPU in interpreter mode. The flag is read when triton is first
    # imported, and transformers imports triton, so it must be set before the import below.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from transformers import (  # noqa: E402
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
    Starcoder2Config,
    Starcoder2ForCausalLM,
)

COMMON = dict(
    vocab_size=101, hidden_size=48, intermediate_size=88, num_hidden_layers=4, num_attention_heads=6,
    num_key_value_heads=2, max_position_embeddings=64,
)

FAMILIES = {
    "llama": lambda: LlamaForCausalLM(LlamaConfig(**COMMON, tie_word_embeddings=True)),
    "llama_mha_untied": lambda: LlamaForCausalLM(LlamaConfig(**{**COMMON, "num_key_value_heads": 6})),
    "mistral": lambda: MistralForCausalLM(MistralConfig(**COMMON, sliding_window=None)),
    "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**COMMON, tie_word_embeddings=True)),
    "qwen3": lambda: Qwen3ForCausalLM(Qwen3Config(**COMMON, head_dim=8)),
    "starcoder2": lambda: Starcoder2ForCausalLM(Starcoder2Config(**COMMON, use_bias=True)),
    # sandwich norms, (1 + w) RMSNorm, sqrt(D)-scaled tied embeddings, both soft-caps active, a small
    # sliding window on mixed layer_types (window 4 < the 16-token calibration rows)
    "gemma2": lambda: Gemma2ForCausalLM(Gemma2Config(
        **COMMON, head_dim=8, query_pre_attn_scalar=8, final_logit_softcapping=30.0, attn_logit_softcapping=50.0,
        sliding_window=4, layer_types=["sliding_attention", "full_attention"] * 2)),
    # + per-head q/k norms, local/global rope bases, final soft-cap set (Gemma 3 ships without one)
    "gemma3": lambda: Gemma3ForCausalLM(Gemma3TextConfig(
        **COMMON, head_dim=8, query_pre_attn_scalar=8, final_logit_softcapping=30.0, sliding_window=4,
        layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"])),
    # fused qkv_proj / gate_up_proj, partial rotary
    "phi3": lambda: Phi3ForCausalLM(Phi3Config(
        **COMMON, head_dim=8, partial_rotary_factor=0.5, tie_word_embeddings=False, pad_token_id=0, bos_token_id=1,
        eos_token_id=2)),
}


def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give norms, biases and weights non-trivial values so that a wrong index shows up."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g) if name.endswith("weight") else 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.08 * torch.randn(p.shape, generator=g))
    return model.eval()


def make_model(family: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return randomize_(FAMILIES[family](), seed)


@pytest.fixture(params=sorted(FAMILIES))
def family(request) -> str:
    return request.param


@pytest.fixture
def calib_ids() -> torch.Tensor:
    return torch.randint(0, COMMON["vocab_size"], (10, 16), generator=torch.Generator().manual_seed(1))


def save_checkpoint(path, family: str = "llama", seed: int = 0):
    """A tiny model of ``family`` saved as a local HF checkpoint, with the built-in tokenizer's files.

    The tokenizer only has to load and save (its ids exceed the tiny vocabulary: use token-id data
    or ``--method random`` with it).
    """
    import shutil
    from pathlib import Path

    from minitron.data import BUILTIN_MODEL

    path = Path(path)
    make_model(family, seed).save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(BUILTIN_MODEL / name, path / name)
    return path
