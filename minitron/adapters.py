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

Mixture-of-experts families (Mixtral, Qwen2-MoE with its shared expert, Qwen3-MoE) add a
:class:`MoESpec`: in a sparse layer the MLP is a router ``(E, D)`` plus experts stored as fused
3-D tensors ``gate_up_proj (E, 2F, D)`` and ``down_proj (E, D, F)`` (transformers >= 5); Qwen
MoE models may keep dense MLP layers (``mlp_only_layers`` / ``decoder_sparse_step``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn


@dataclass(frozen=True)
class MoESpec:
    """Where the mixture-of-experts parts of a sparse decoder layer live (paths from the layer).

    ``router`` is a module whose ``weight`` is (E, D); ``experts`` holds ``gate_up_proj`` (E, 2F, D)
    (rows ``[gate | up]`` per expert) and ``down_proj`` (E, D, F). ``shared_expert`` (Qwen2-MoE) is a
    dense gated MLP added to every token, scaled by ``sigmoid(shared_gate(x))``.
    """

    cfg_experts: str  # config field of the expert count
    cfg_expert_ffn: str  # config field of each expert's FFN width
    router: str = "mlp.gate"
    experts: str = "mlp.experts"
    shared_expert: str | None = None
    shared_gate: str | None = None
    cfg_shared_ffn: str | None = None


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
    # mixture of experts (None: every layer has a dense MLP)
    moe: MoESpec | None = None

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

MIXTRAL = FamilyAdapter(name="mixtral", model_types=("mixtral",),
                        moe=MoESpec(cfg_experts="num_local_experts", cfg_expert_ffn="intermediate_size"))
QWEN2_MOE = FamilyAdapter(name="qwen2_moe", model_types=("qwen2_moe",), moe=MoESpec(
    cfg_experts="num_experts", cfg_expert_ffn="moe_intermediate_size", shared_expert="mlp.shared_expert",
    shared_gate="mlp.shared_expert_gate", cfg_shared_ffn="shared_expert_intermediate_size"))
QWEN3_MOE = FamilyAdapter(name="qwen3_moe", model_types=("qwen3_moe",),
                          moe=MoESpec(cfg_experts="num_experts", cfg_expert_ffn="moe_intermediate_size"))

ADAPTERS: tuple[FamilyAdapter, ...] = (LLAMA, STARCODER2, GEMMA, PHI3, MIXTRAL, QWEN2_MOE, QWEN3_MOE)
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
            return adapter
    raise ValueError(unsupported_message(model_type, type(model).__name__))


def unsupported_message(model_type: str | None, what: str) -> str:
    """The one-line error for an architecture minitron has no adapter for, listing the supported families.

    Args:
        model_type: the config's ``model_type``.
        what: what the model is, e.g. its class name.
    Returns:
        The message.
    Example:
        >>> unsupported_message("t5", "T5Config, not a causal LM")
        "unsupported architecture: model_type='t5' (T5Config, not a causal LM); minitron supports ..."
    """
    return (f"unsupported architecture: model_type={model_type!r} ({what}); "
            f"minitron supports causal LMs of model_type {', '.join(SUPPORTED_MODEL_TYPES)}")


def adapter_for_config(config) -> FamilyAdapter | None:
    """The adapter of ``config.model_type`` (None when unsupported)."""
    return next((a for a in ADAPTERS if getattr(config, "model_type", None) in a.model_types), None)


def moe_spec_of(config) -> MoESpec | None:
    """The :class:`MoESpec` of a mixture-of-experts config, None for dense families."""
    adapter = adapter_for_config(config)
    return adapter.moe if adapter is not None else None


def moe_sizes(config) -> dict[str, int | None]:
    """``num_experts``, ``expert_intermediate_size``, ``shared_expert_intermediate_size`` of ``config``
    under minitron's names (``None``: no such axis, e.g. a dense model)."""
    spec = moe_spec_of(config)
    return {
        "num_experts": getattr(config, spec.cfg_experts) if spec else None,
        "expert_intermediate_size": getattr(config, spec.cfg_expert_ffn) if spec else None,
        "shared_expert_intermediate_size": getattr(config, spec.cfg_shared_ffn) if spec and spec.cfg_shared_ffn else None,
    }


def sparse_layers(config) -> list[bool]:
    """Per decoder layer: True where the MLP is a sparse MoE block (the rule the MoE families build with).

    Mixtral: every layer. Qwen2/3-MoE: layer ``l`` unless ``l in mlp_only_layers`` or
    ``(l + 1) % decoder_sparse_step != 0``. Dense families: all False.

    Example:
        >>> sparse_layers(Qwen2MoeConfig(num_hidden_layers=4, mlp_only_layers=[1]))
        [True, False, True, True]
    """
    n = config.num_hidden_layers
    spec = moe_spec_of(config)
    if spec is None or not getattr(config, spec.cfg_experts, 0):
        return [False] * n
    dense = set(getattr(config, "mlp_only_layers", None) or [])
    step = getattr(config, "decoder_sparse_step", 1) or 1
    return [l not in dense and (l + 1) % step == 0 for l in range(n)]


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


def layer_output(output) -> Any:
    """The hidden states a decoder layer returns (a tensor, or the first element of a tuple).

    Args:
        output: what a decoder layer's forward returned.
    Returns:
        The (B, S, D) hidden states.
    Example:
        >>> layer_output((h, None)) is h
        True
    """
    return output[0] if isinstance(output, (tuple, list)) else output


def layer_io(args: tuple, kwargs: dict, output) -> tuple[Any, Any]:
    """A decoder layer's (input, output) hidden states, as a ``with_kwargs=True`` forward hook sees them.

    Args:
        args / kwargs: the layer's positional and keyword arguments (``hidden_states`` either way).
        output: what its forward returned.
    Returns:
        ``(h_in, h_out)``, both (B, S, D).
    Example:
        >>> layer.register_forward_hook(lambda m, a, kw, out: print(*layer_io(a, kw, out)), with_kwargs=True)
    """
    h_in = args[0] if args else kwargs["hidden_states"]
    return h_in, layer_output(output)
