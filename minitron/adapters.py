"""Per-family adapters: map a Hugging Face causal LM onto minitron's common layout.

Every supported family is a pre-norm decoder stack ``embed -> [norm -> attn -> +,
norm -> mlp -> +] x L -> final norm -> lm_head``. An adapter names, relative to
the model root and to one decoder layer, where each role lives, so importance
hooks and pruning code never mention a family by name.

Supported: Llama (incl. GQA, tied embeddings), Mistral, Qwen2 (q/k/v bias),
Qwen3 (per-head q/k norms), Starcoder2 (non-gated GELU MLP, LayerNorm with
bias, biases on every projection), Gemma 2 and Gemma 3 text (sandwich norms: four
RMSNorms per layer, ``(1 + weight)`` RMSNorm, embeddings scaled by ``sqrt(hidden_size)``,
attention / final-logit soft-capping, sliding-window ``layer_types``) and Phi-3 (fused
``qkv_proj`` and ``gate_up_proj``, partial rotary).

Mixture-of-experts models (Mixtral, Qwen2-MoE, Qwen3-MoE) are refused: their MLP is a router
plus per-expert weights, which need per-expert neuron importance and gathers.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class FamilyAdapter:
    """Where each role of the common layout lives in one model family.

    Paths are dotted module names: model-level ones from the ``*ForCausalLM``
    root, layer-level ones from a decoder layer.
    """

    name: str
    model_types: tuple[str, ...]
    embed: str = "model.embed_tokens"
    layers: str = "model.layers"
    final_norm: str = "model.norm"
    lm_head: str = "lm_head"
    q_proj: str = "self_attn.q_proj"
    k_proj: str = "self_attn.k_proj"
    v_proj: str = "self_attn.v_proj"
    o_proj: str = "self_attn.o_proj"
    up_proj: str = "mlp.up_proj"
    gate_proj: str | None = "mlp.gate_proj"  # None for non-gated MLPs
    down_proj: str = "mlp.down_proj"
    layer_norms: tuple[str, ...] = ("input_layernorm", "post_attention_layernorm")
    # fused projections (Phi-3): rows are [q heads | k heads | v heads] and [gate | up]
    qkv_proj: str | None = None
    gate_up_proj: str | None = None
    # RMSNorm computes ``x_hat * (norm_offset + weight)`` (Gemma: 1.0): rescales act on the sum
    norm_offset: float = 0.0
    # the embedding output is multiplied by sqrt(config.hidden_size) (Gemma's ``embed_scale``)
    embed_scaled: bool = False

    # config field names (shared by all families supported today)
    cfg_hidden: str = "hidden_size"
    cfg_ffn: str = "intermediate_size"
    cfg_heads: str = "num_attention_heads"
    cfg_kv_heads: str = "num_key_value_heads"
    cfg_layers: str = "num_hidden_layers"

    @property
    def mlp_in(self) -> tuple[str, ...]:
        """Projections whose output rows are MLP neurons."""
        if self.gate_up_proj:
            return (self.gate_up_proj,)
        return (self.gate_proj, self.up_proj) if self.gate_proj else (self.up_proj,)

    @property
    def attn_in(self) -> tuple[str, ...]:
        """Projections whose output rows are attention heads (q, k, v or the fused qkv)."""
        return (self.qkv_proj,) if self.qkv_proj else (self.q_proj, self.k_proj, self.v_proj)

    @property
    def hidden_in(self) -> tuple[str, ...]:
        """Layer projections that read the residual stream (input columns = hidden channels)."""
        return (*self.attn_in, *self.mlp_in)

    @property
    def hidden_out(self) -> tuple[str, ...]:
        """Layer projections that write the residual stream (output rows = hidden channels)."""
        return (self.o_proj, self.down_proj)


LLAMA = FamilyAdapter(name="llama", model_types=("llama", "mistral", "qwen2", "qwen3"))
STARCODER2 = FamilyAdapter(
    name="starcoder2", model_types=("starcoder2",), up_proj="mlp.c_fc", gate_proj=None, down_proj="mlp.c_proj"
)

GEMMA = FamilyAdapter(
    name="gemma", model_types=("gemma2", "gemma3_text"),
    layer_norms=("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                 "post_feedforward_layernorm"),
    norm_offset=1.0, embed_scaled=True,
)
PHI3 = FamilyAdapter(name="phi3", model_types=("phi3",), qkv_proj="self_attn.qkv_proj", gate_up_proj="mlp.gate_up_proj")

ADAPTERS: tuple[FamilyAdapter, ...] = (LLAMA, STARCODER2, GEMMA, PHI3)
SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(t for a in ADAPTERS for t in a.model_types)


def get_adapter(model: nn.Module) -> FamilyAdapter:
    """Return the adapter for ``model`` or raise a ``ValueError`` listing the supported families.

    Args:
        model: a Hugging Face ``*ForCausalLM`` module with a ``config.model_type``.
    Returns:
        The matching :class:`FamilyAdapter`.

    Example:
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> get_adapter(LlamaForCausalLM(LlamaConfig(num_hidden_layers=1, hidden_size=64,
        ...     intermediate_size=128, num_attention_heads=4, vocab_size=100))).name
        'llama'
    """
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    for adapter in ADAPTERS:
        if model_type in adapter.model_types:
            if getattr(config, "num_experts", None) or getattr(config, "num_local_experts", None):
                break
            return adapter
    raise ValueError(
        f"unsupported architecture: model_type={model_type!r} ({type(model).__name__}); "
        f"minitron supports dense causal LMs of model_type {', '.join(SUPPORTED_MODEL_TYPES)}"
    )


def decoder_layers(model: nn.Module, adapter: FamilyAdapter) -> nn.ModuleList:
    return model.get_submodule(adapter.layers)


def head_dim_of(config) -> int:
    """The attention head size, explicit or implied by hidden_size / num_attention_heads."""
    head_dim = getattr(config, "head_dim", None)
    return int(head_dim) if head_dim else config.hidden_size // config.num_attention_heads


def kv_heads_of(config) -> int:
    kv = getattr(config, "num_key_value_heads", None)
    return int(kv) if kv else int(config.num_attention_heads)


def base_decoder(model: nn.Module) -> nn.Module:
    """The decoder stack of a causal LM (embeddings, ``.layers``, final norm; returns ``last_hidden_state``).

    Args:
        model: a Hugging Face ``*ForCausalLM`` (``get_decoder()``, else its ``.model``).
    Raises:
        ValueError: no base decoder with a ``.layers`` list.
    """
    dec = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", None)
    if dec is None or not hasattr(dec, "layers"):
        raise ValueError(
            f"{type(model).__name__}: cannot find the base decoder with a .layers list "
            "(expected a Hugging Face *ForCausalLM with model.get_decoder())"
        )
    return dec


def lm_head_params(model: nn.Module):
    """``(weight (V, H), bias (V,) | None)`` of the output embeddings (tied: the input embedding's weight).

    Raises:
        ValueError: the model has no output embeddings.
    """
    head = model.get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(model).__name__} has no output embeddings (lm_head)")
    return head.weight, getattr(head, "bias", None)
