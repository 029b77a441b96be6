"""Unit tests of the distillation losses: intermediate states, dynamic alpha, chunked CE, trainer KD use."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from minitron.distillation import DistillConfig, IntermediateProjections, dynamic_alpha, intermediate_state_loss, linear_cross_entropy
from minitron.distillation.module import DistillModule


def _tiny(vocab=128, hidden=32, layers=2, heads=4, kv=2, inter=64, tie=False, seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv, tie_word_embeddings=tie)
    return LlamaForCausalLM(cfg)


@pytest.mark.parametrize("kind", ["mse", "cosine"])
@pytest.mark.parametrize("masked", [False, True])
def test_intermediate_loss_matches_direct_formula(kind, masked):
    torch.manual_seed(0)
    B, T, Hs, Ht = 3, 5, 7, 11  # odd shapes
    pairs = [(0, 1), (2, 3)]
    proj = IntermediateProjections(pairs, Hs, Ht)
    s = [torch.randn(B, T, Hs, requires_grad=True) for _ in pairs]
    t = [torch.randn(B, T, Ht) for _ in pairs]
    mask = torch.rand(B, T) > 0.4 if masked else None
    got = intermediate_state_loss(s, t, proj.proj, mask=mask, kind=kind)
    g_got = torch.autograd.grad(got, s + list(proj.parameters()))

    # direct: per pair, token losses over counted tokens, averaged over pairs
    m = mask if mask is not None else torch.ones(B, T, dtype=torch.bool)
    ref = 0.0
    for si, ti, lin in zip(s, t, proj.proj):
        p = si @ lin.weight.t() + lin.bias  # (B, T, Ht)
        if kind == "mse":
            tok = ((p - ti) ** 2).sum(-1) / Ht
        else:
            tok = 1 - (p * ti).sum(-1) / (p.norm(dim=-1) * ti.norm(dim=-1))
        ref = ref + tok[m].mean()
    ref = ref / len(pairs)
    g_ref = torch.autograd.grad(ref, s + list(proj.parameters()))
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    for a, b in zip(g_got, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    if masked:  # masked tokens get no gradient
        assert torch.all(g_got[0][~mask] == 0)


def test_square_projection_starts_as_identity():
    proj = IntermediateProjections([(0, 0)], 6, 6)
    x = torch.randn(2, 3, 6)
    torch.testing.assert_close(proj.proj[0](x), x)


def test_dynamic_alpha_value_and_gradient():
    torch.manual_seed(0)
    w = torch.randn(4, requires_grad=True)
    l_logits = (w**2).sum() * 3.0
    l_is = (w - 1).abs().sum() * 0.1
    alpha = dynamic_alpha(l_logits, l_is)
    assert not alpha.requires_grad
    torch.testing.assert_close(alpha, l_logits.detach() / l_is.detach())
    total = l_logits + alpha * l_is
    torch.testing.assert_close(total, 2 * l_logits.detach())  # alpha * L_is has the scale of L_logits
    (g,) = torch.autograd.grad(total, w)
    g_ref = 6.0 * w.detach() + alpha * 0.1 * torch.sign(w.detach() - 1)
    torch.testing.assert_close(g, g_ref)
    assert torch.isfinite(dynamic_alpha(torch.tensor(1.0), torch.tensor(0.0)))


@pytest.mark.parametrize("chunk", [3, 1024])
def test_linear_cross_entropy_matches_full_logits(chunk):
    torch.manual_seed(0)
    N, H, V = 10, 6, 37
    h = torch.randn(N, H, requires_grad=True)
    w = torch.randn(V, H, requires_grad=True)
    b = torch.randn(V, requires_grad=True)
    y = torch.randint(0, V, (N,))
    y[[1, 7]] = -100
    got = linear_cross_entropy(h, w, y, b, chunk_size=chunk)
    ref = F.cross_entropy(h @ w.t() + b, y, ignore_index=-100)
    torch.testing.assert_close(got, ref)
    for a, r in zip(torch.autograd.grad(got, (h, w, b)), torch.autograd.grad(ref, (h, w, b))):
        torch.testing.assert_close(a, r)


@pytest.mark.parametrize("temperature,top_k,vs,kind", [(1.0, None, 128, "forward_kl"), (2.0, 5, 128, "forward_kl"),
                                                       (1.0, None, 136, "forward_kl"), (1.0, None, 128, "reverse_kl")])
def test_trainer_kd_loss_equals_direct_logits_kl(temperature, top_k, vs, kind):
    teacher = _tiny(seed=1)
    student = _tiny(vocab=vs, hidden=16, layers=1, heads=2, kv=1, inter=32, tie=True, seed=2)
    cfg = DistillConfig(steps=1, seq_len=8, batch_size=2, temperature=temperature, top_k=top_k, warmup_steps=0,
                        logits_loss=kind)
    mod = DistillModule(student, teacher.eval().requires_grad_(False), cfg)
    x = torch.randint(0, 128, (2, 8))
    got = mod(x)["kd_loss"]
    params = [p for p in student.parameters()]
    g_got = torch.autograd.grad(got, params)

    s = student(x).logits.float() / temperature  # (B, T, Vs)
    with torch.no_grad():
        t = teacher(x).logits.float() / temperature  # (B, T, 128)
    t = F.pad(t, (0, vs - 128), value=float("-inf"))
    if top_k is not None:
        idx = t.topk(top_k, -1).indices
        s, t = s.gather(-1, idx), t.gather(-1, idx)
    log_p, log_q = t.log_softmax(-1), s.log_softmax(-1)
    if kind == "reverse_kl":  # KL(student || teacher)
        log_p, log_q = log_q, log_p
    p = log_p.exp()
    kl = torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p)).sum(-1)  # (B, T)
    ref = kl.mean() * temperature**2
    g_ref = torch.autograd.grad(ref, params)
    # fp32 on both sides; the fused/chunked path sums in another order than the full-logits reference
    torch.testing.assert_close(got, ref, rtol=2e-4, atol=1e-6)
    for a, b in zip(g_got, g_ref):
        torch.testing.assert_close(a, b, rtol=2e-4, atol=1e-6)
