"""Shared test helpers: tiny models of every supported family, tiny distillation setups, Triton support.

Plain functions and constants (fixtures live in ``conftest.py``). Nothing here imports
transformers or triton at import time: ``tests/kernels/conftest.py`` must set the Triton
interpreter flag before triton is first imported (transformers imports it).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import torch

# ---- tiny models of every supported family -------------------------------------------------

COMMON = dict(
    vocab_size=101, hidden_size=48, intermediate_size=88, num_hidden_layers=4, num_attention_heads=6,
    num_key_value_heads=2, max_position_embeddings=64,
)


def _build(family: str) -> torch.nn.Module:
    import transformers as tf

    if family == "llama":
        return tf.LlamaForCausalLM(tf.LlamaConfig(**COMMON, tie_word_embeddings=True))
    if family == "llama_mha_untied":
        return tf.LlamaForCausalLM(tf.LlamaConfig(**{**COMMON, "num_key_value_heads": 6}))
    if family == "mistral":
        return tf.MistralForCausalLM(tf.MistralConfig(**COMMON, sliding_window=None))
    if family == "qwen2":
        return tf.Qwen2ForCausalLM(tf.Qwen2Config(**COMMON, tie_word_embeddings=True))
    if family == "qwen3":
        return tf.Qwen3ForCausalLM(tf.Qwen3Config(**COMMON, head_dim=8))
    if family == "starcoder2":
        return tf.Starcoder2ForCausalLM(tf.Starcoder2Config(**COMMON, use_bias=True))
    # sandwich norms, (1 + w) RMSNorm, sqrt(D)-scaled tied embeddings, both soft-caps active, a small
    # sliding window on mixed layer_types (window 4 < the 16-token calibration rows)
    if family == "gemma2":
        return tf.Gemma2ForCausalLM(tf.Gemma2Config(
            **COMMON, head_dim=8, query_pre_attn_scalar=8, final_logit_softcapping=30.0, attn_logit_softcapping=50.0,
            sliding_window=4, layer_types=["sliding_attention", "full_attention"] * 2))
    # + per-head q/k norms, local/global rope bases, final soft-cap set (Gemma 3 ships without one)
    if family == "gemma3":
        return tf.Gemma3ForCausalLM(tf.Gemma3TextConfig(
            **COMMON, head_dim=8, query_pre_attn_scalar=8, final_logit_softcapping=30.0, sliding_window=4,
            layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"]))
    # fused qkv_proj / gate_up_proj, partial rotary
    if family == "phi3":
        return tf.Phi3ForCausalLM(tf.Phi3Config(
            **COMMON, head_dim=8, partial_rotary_factor=0.5, tie_word_embeddings=False, pad_token_id=0, bos_token_id=1,
            eos_token_id=2))
    raise KeyError(family)


FAMILY_NAMES = ("llama", "llama_mha_untied", "mistral", "qwen2", "qwen3", "starcoder2", "gemma2", "gemma3", "phi3")
FAMILIES = {name: (lambda name=name: _build(name)) for name in FAMILY_NAMES}


MOE_FAMILY_NAMES = ("mixtral", "qwen2_moe", "qwen3_moe")
MOE_COMMON = {k: v for k, v in COMMON.items() if k != "intermediate_size"}


def make_moe_model(family: str, seed: int = 0) -> torch.nn.Module:
    """Tiny random MoE models: 6 experts, top-2. Mixtral (every layer sparse); Qwen2-MoE with a shared expert
    and a dense layer 1 (``mlp_only_layers``); Qwen3-MoE with dense layers 0 and 2 (``decoder_sparse_step=2``)
    and renormalised top-k weights."""
    import transformers as tf

    torch.manual_seed(seed)
    if family == "mixtral":
        model = tf.MixtralForCausalLM(tf.MixtralConfig(**MOE_COMMON, intermediate_size=40, num_local_experts=6,
                                                       num_experts_per_tok=2))
    elif family == "qwen2_moe":
        model = tf.Qwen2MoeForCausalLM(tf.Qwen2MoeConfig(
            **MOE_COMMON, intermediate_size=88, moe_intermediate_size=40, shared_expert_intermediate_size=56,
            num_experts=6, num_experts_per_tok=2, mlp_only_layers=[1]))
    elif family == "qwen3_moe":
        model = tf.Qwen3MoeForCausalLM(tf.Qwen3MoeConfig(
            **MOE_COMMON, head_dim=8, intermediate_size=88, moe_intermediate_size=40, num_experts=6,
            num_experts_per_tok=2, decoder_sparse_step=2, norm_topk_prob=True))
    else:
        raise KeyError(family)
    return randomize_(model, seed)


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


def assert_kv_cache_generation(model: torch.nn.Module, ids: torch.Tensor) -> None:
    """Incremental decoding with the KV cache equals a full forward, and greedy generation runs.

    ``ids``: (B >= 1, >= 12) token ids; the cache holds the first 8 positions, then the rest are decoded.
    """
    ids = ids[:2, :12]
    with torch.no_grad():
        out = model(input_ids=ids[:, :8], use_cache=True)
        step = model(input_ids=ids[:, 8:], past_key_values=out.past_key_values, use_cache=True).logits
        full = model(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(step, full[:, 8:], atol=1e-5, rtol=1e-4)
    generated = model.generate(ids[:1, :4], max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0)
    assert generated.shape == (1, 8)


def save_checkpoint(path, family: str = "llama", seed: int = 0):
    """A tiny model of ``family`` saved as a local HF checkpoint, with the built-in tokenizer's files.

    The tokenizer only has to load and save (its ids exceed the tiny vocabulary: use token-id data
    or ``--method random`` with it).
    """
    from minitron.data import BUILTIN_MODEL

    path = Path(path)
    make_model(family, seed).save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(BUILTIN_MODEL / name, path / name)
    return path


# ---- tiny distillation setups ----------------------------------------------------------------

V, T = 64, 32  # vocabulary and block length of the distillation tests


def tiny(hidden=32, layers=2, heads=4, kv=2, inter=64, seed=0, **kw):
    """A random ``LlamaForCausalLM`` with vocabulary ``V`` (the default teacher of the distillation tests)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=V, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                                        num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=64, **kw))


def small_student(seed=1, **kw):
    return tiny(hidden=16, layers=1, heads=2, kv=1, inter=32, seed=seed, **kw)


def rows(run_dir: Path, split: str) -> list[dict]:
    with open(run_dir / "metrics.jsonl", encoding="utf-8") as f:
        return [r for r in map(json.loads, f) if r["split"] == split]


def quick_cfg(tmp: Path, **kw):
    from minitron.distillation import DistillConfig

    base = dict(steps=8, seq_len=T, batch_size=8, lr=1e-2, min_lr=1e-3, warmup_steps=2, save_every=0, eval_every=0, threads=1,
                output_dir=str(tmp), progress=False, plot=False)
    return DistillConfig(**{**base, **kw})


# ---- Triton ------------------------------------------------------------------------------------

def have_triton() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def triton_runnable() -> bool:
    """Triton kernels can run here: CUDA, or CPU with triton imported in interpreter mode."""
    if not have_triton():
        return False
    if torch.cuda.is_available():
        return True
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(tl.zeros, InterpretedFunction)


def rerun_in_interpreter(test_file: str, keyword: str, allowed_skips: str | None = None) -> None:
    """Run ``test_file``'s tests matching ``keyword`` in a fresh pytest process with TRITON_INTERPRET=1.

    For a process that imported triton before the interpreter flag was set (the flag is read at
    import). The child imports triton with the flag set, so its Triton tests can run and must not
    skip: this fails with the end of the child's output unless it passed and every skip's reason
    matches the regex ``allowed_skips`` (``None``: no skip at all), e.g. an optional third-party
    comparison whose package is absent.
    """
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", test_file, "-k", keyword]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, cwd=Path(__file__).resolve().parents[1])
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert " passed" in r.stdout
    check_skips(r.stdout, allowed_skips)


def python_subprocess(code: str, **env: str) -> tuple[str, str]:
    """Run ``code`` in a fresh interpreter from the checkout root with extra ``env``: (stdout, stderr).

    For what depends on import-time state (``TRITON_INTERPRET``, a missing package); fails with the
    child's stderr unless it exits 0.
    """
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, **env, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300, cwd=root)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout, r.stderr


def check_skips(pytest_output: str, allowed: str | None) -> None:
    """Raise unless every ``SKIPPED`` line of a ``pytest -rs`` output has a reason matching ``allowed``."""
    reasons = re.findall(r"^SKIPPED \[\d+\] \S+?:\d+: (.*)$", pytest_output, flags=re.M)
    if " skipped" in pytest_output and not reasons:
        raise AssertionError("skipped tests without a reported reason (run pytest with -rs)")
    bad = [x for x in reasons if allowed is None or not re.search(allowed, x)]
    assert not bad, f"tests skipped in the Triton interpreter run: {bad}\n{pytest_output[-4000:]}"


# ---- tiny GGUF files ---------------------------------------------------------------------------

def write_tiny_gguf(path, seed: int = 0, with_tensors: bool = True) -> Path:
    """A tiny float32 Llama GGUF file (hidden 64, 2 layers) with the built-in model's BPE tokenizer.

    ``with_tensors=False`` writes the tokenizer and metadata only (0 tensors). The same ``seed``
    gives the same bytes; another seed, a file of the same size with other weights.
    """
    import gguf
    import numpy as np

    from minitron.data import BUILTIN_MODEL

    tok = json.loads((BUILTIN_MODEL / "tokenizer.json").read_text(encoding="utf-8"))["model"]
    tokens = [t for t, _ in sorted(tok["vocab"].items(), key=lambda kv: kv[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["merges"]]
    vocab, hidden, ffn, layers, heads, kv = len(tokens), 64, 128, 2, 4, 2
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(layers)
    w.add_context_length(64)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(vocab)
    w.add_rope_dimension_count(hidden // heads)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types([1] * vocab)
    w.add_token_merges(merges)
    w.add_bos_token_id(0)
    w.add_eos_token_id(0)
    if with_tensors:
        g = np.random.default_rng(seed)
        kv_rows = kv * hidden // heads
        shapes = {"token_embd.weight": (vocab, hidden), "output_norm.weight": (hidden,)}
        for l in range(layers):
            shapes.update({f"blk.{l}.{name}": shape for name, shape in (
                ("attn_norm.weight", (hidden,)), ("ffn_norm.weight", (hidden,)), ("attn_q.weight", (hidden, hidden)),
                ("attn_k.weight", (kv_rows, hidden)), ("attn_v.weight", (kv_rows, hidden)),
                ("attn_output.weight", (hidden, hidden)), ("ffn_gate.weight", (ffn, hidden)),
                ("ffn_up.weight", (ffn, hidden)), ("ffn_down.weight", (hidden, ffn)))})
        for name, shape in shapes.items():
            w.add_tensor(name, (0.05 * g.standard_normal(shape)).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Path(path)
