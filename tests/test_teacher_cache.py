"""Offline teacher (issue #23 part 3, library side): the cache files, their checks, and the top-k + tail KD loss.

``topk_tail_kd_loss`` is checked against a naive full-logits computation of the same bucketed KL
(fp32: 2e-5 of the largest entry, loss and gradients) and, with k = V, against the full forward KL.
"""

from __future__ import annotations

import json

import pytest
import torch

from tests.helpers import T, V, small_student, tiny

from minitron.distillation.teacher_cache import MANIFEST, TeacherCache, cache_teacher_logits
from minitron.losses import linear_kd_loss
from minitron.losses.cached import log_tail, topk_tail_kd_loss


def _rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def naive_bucketed_kl(hs, ws, ht, wt, k, tau=1.0, bs=None):
    """Full (N, V) float64 logits: KL over the teacher's top-k ids and one bucket holding the rest, times tau^2.

    float64, so ``1 - sum`` of the k probabilities is exact enough for the tail bucket.
    """
    s = (hs.double() @ ws.double().t() + (0 if bs is None else bs.double())) / tau
    t = (ht.double() @ wt.double().t()) / tau
    idx = t.topk(k, -1).indices
    log_p, log_q = t.log_softmax(-1), s.log_softmax(-1)
    p_k, q_k = log_p.gather(-1, idx).exp(), log_q.gather(-1, idx).exp()
    p_tail = (1 - p_k.sum(-1)).clamp_min(0)
    q_tail = 1 - q_k.sum(-1)
    kl = (p_k * (p_k.log() - q_k.log())).sum(-1)
    if k < t.shape[-1]:
        kl = kl + torch.where(p_tail > 0, p_tail * (p_tail.clamp_min(1e-300).log() - q_tail.log()), 0.0)
    return (kl.mean() * tau * tau).float()


def _data(seed=0, n=37, hs=24, ht=16, v=211):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, hs, generator=g, dtype=torch.float64).float().requires_grad_(),
            (torch.randn(v, hs, generator=g) * 0.4).requires_grad_(),
            torch.randn(n, ht, generator=g), torch.randn(v, ht, generator=g) * 0.4)


def _cached(ht, wt, k, tau):
    t = ht @ wt.t()  # (N, V)
    top = t.topk(k, -1)
    return top.indices, top.values, torch.logsumexp(t / tau, -1)


@pytest.mark.parametrize("k,tau,bias", [(1, 1.0, False), (7, 2.0, True), (50, 0.7, False), (211, 1.0, False)])
def test_topk_tail_loss_matches_naive(k, tau, bias):
    hs, ws, ht, wt = _data()
    bs = (torch.randn(211) * 0.3).requires_grad_() if bias else None
    ids, z, lse = _cached(ht, wt, k, tau)
    got = topk_tail_kd_loss(hs, ws, ids, z, lse, student_bias=bs, temperature=tau, chunk_size=10)
    params = [hs, ws] + ([bs] if bias else [])
    g_got = torch.autograd.grad(got, params)
    ref = naive_bucketed_kl(hs, ws, ht, wt, k, tau, bs)
    g_ref = torch.autograd.grad(ref, params)
    assert _rel(got, ref) <= 2e-5, (got, ref)
    for a, b in zip(g_got, g_ref):
        assert _rel(a, b) <= 2e-5, _rel(a, b)
    if k == 211:  # the whole vocabulary: the plain forward KL
        full = linear_kd_loss(hs.detach(), ws.detach(), ht, wt, impl="naive")
        assert _rel(got.detach(), full) <= 2e-5


def test_tail_bucket_is_exact_not_renormalised():
    """The tail's mass changes the loss: renormalising over the k ids (linear_kd_loss top_k) differs."""
    hs, ws, ht, wt = _data()
    ids, z, lse = _cached(ht, wt, 5, 1.0)
    ours = topk_tail_kd_loss(hs, ws, ids, z, lse)
    renorm = linear_kd_loss(hs, ws, ht, wt, top_k=5, impl="naive")
    full = linear_kd_loss(hs, ws, ht, wt, impl="naive")
    assert abs(ours.item() - renorm.item()) > 1e-3
    assert ours.item() <= full.item() + 1e-6  # grouping outcomes never increases a KL
    assert log_tail(torch.zeros(1, 1)).item() == float("-inf")  # all the mass in the k ids: no tail


def test_mask_and_errors():
    hs, ws, ht, wt = _data()
    ids, z, lse = _cached(ht, wt, 6, 1.0)
    mask = torch.arange(37) % 3 != 0
    got = topk_tail_kd_loss(hs, ws, ids, z, lse, mask=mask)
    ref = topk_tail_kd_loss(hs[mask], ws, ids[mask], z[mask], lse[mask])
    torch.testing.assert_close(got, ref)
    assert topk_tail_kd_loss(hs, ws, ids, z, lse, mask=torch.zeros(37)).item() == 0.0
    with pytest.raises(ValueError, match="cached teacher ids reach"):
        topk_tail_kd_loss(hs, ws[:100], ids, z, lse)
    with pytest.raises(ValueError, match="do not fit 37 tokens"):
        topk_tail_kd_loss(hs, ws, ids[:5], z, lse)


def test_cache_round_trip_and_refusals(tmp_path):
    teacher = tiny(seed=0)
    blocks = torch.randint(0, V, (5, T), generator=torch.Generator().manual_seed(0))
    path = cache_teacher_logits(teacher, blocks, tmp_path / "c", top_k=8, temperature=2.0, batch_size=2, shard_blocks=2)
    man = json.loads((path / MANIFEST).read_text())
    assert [s["n_blocks"] for s in man["shards"]] == [2, 2, 1] and man["bytes_per_token"] == 8 * 8 + 4
    cache = TeacherCache(path)
    cache.check(blocks, top_k=8, temperature=2.0)
    order = torch.tensor([4, 0, 3])
    ids, z, lse = cache.rows(order)
    assert ids.shape == (3, T, 8) and z.shape == (3, T, 8) and lse.shape == (3, T)
    with torch.no_grad():  # what the teacher gives for those blocks now
        logits = teacher(input_ids=blocks[order]).logits.float()  # (3, T, V)
    top = logits.topk(8, -1)
    assert torch.equal(ids, top.indices)
    torch.testing.assert_close(z, top.values, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, torch.logsumexp(logits / 2.0, -1), rtol=1e-5, atol=1e-5)
    # the student trains on the cache: same loss as against the live teacher's top-k + tail
    student = small_student(seed=1)
    h = student.model(input_ids=blocks[order]).last_hidden_state
    got = topk_tail_kd_loss(h, student.lm_head.weight, ids, z, lse, temperature=2.0)
    h_t = teacher.model(input_ids=blocks[order]).last_hidden_state
    ref = naive_bucketed_kl(h.reshape(-1, h.shape[-1]), student.lm_head.weight, h_t.reshape(-1, h_t.shape[-1]),
                            teacher.lm_head.weight, 8, 2.0)
    assert _rel(got.detach(), ref.detach()) <= 2e-5

    other = blocks.clone()
    other[2, 5] = (other[2, 5] + 1) % V
    with pytest.raises(ValueError, match="built from other tokens"):
        cache.check(other)
    with pytest.raises(ValueError, match="holds 5 blocks of 32 tokens but the data has 4 of 32"):
        cache.check(blocks[:4])
    with pytest.raises(ValueError, match="holds top_k=8, not 16"):
        cache.check(blocks, top_k=16)
    with pytest.raises(ValueError, match="built at temperature 2.0, not 1.0"):
        cache.check(blocks, temperature=1.0)
    with pytest.raises(ValueError, match="has no block 5"):
        cache.rows(torch.tensor([5]))
    with pytest.raises(ValueError, match="exists and is not empty"):
        cache_teacher_logits(teacher, blocks, path, top_k=8)
    with pytest.raises(ValueError, match="is not a teacher cache"):
        TeacherCache(tmp_path)


def test_tokenizer_mismatch_is_refused(tmp_path):
    class Tok:
        def __init__(self, vocab):
            self.vocab, self.name_or_path = vocab, "tok"

        def get_vocab(self):
            return self.vocab

    teacher = tiny(seed=0)
    blocks = torch.randint(0, V, (2, T), generator=torch.Generator().manual_seed(0))
    path = cache_teacher_logits(teacher, blocks, tmp_path / "c", top_k=4, tokenizer=Tok({"a": 0, "b": 1}))
    TeacherCache(path).check(blocks, Tok({"a": 0, "b": 1}))
    with pytest.raises(ValueError, match="built with another tokenizer"):
        TeacherCache(path).check(blocks, Tok({"a": 1, "b": 0}))


def test_distill_from_a_full_vocabulary_cache_equals_online_distill(tmp_path):
    """k = V: the cached loss is the full forward KL, so the run equals the online one step for step."""
    from minitron.distillation import distill

    from tests.helpers import quick_cfg, rows

    teacher, student0 = tiny(seed=0), small_student(seed=1)
    blocks = torch.randint(0, V, (12, T), generator=torch.Generator().manual_seed(0))
    kw = dict(steps=3, batch_size=4, grad_accum=2, mixed_precision="fp32", loss_impl="chunked")
    import copy

    online = distill(copy.deepcopy(student0), teacher, blocks, config=quick_cfg(tmp_path / "online", **kw))
    cache = cache_teacher_logits(teacher, blocks, tmp_path / "cache", top_k=V)
    del teacher  # the cached run has no teacher in memory
    offline = distill(copy.deepcopy(student0), str(cache), blocks, config=quick_cfg(tmp_path / "offline", **kw))
    a, b = rows(tmp_path / "online", "train"), rows(tmp_path / "offline", "train")
    assert len(a) == len(b) == 3
    for x, y in zip(a, b):
        assert y["kd_loss"] == pytest.approx(x["kd_loss"], rel=1e-5)
    for p, q in zip(online.parameters(), offline.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6)


def test_distill_from_a_topk_cache_trains_and_refuses_mismatches(tmp_path):
    from minitron.distillation import distill

    from tests.helpers import quick_cfg, rows

    teacher = tiny(seed=0)
    blocks = torch.randint(0, V, (8, T), generator=torch.Generator().manual_seed(0))
    cache = cache_teacher_logits(teacher, blocks, tmp_path / "cache", top_k=8)
    ev = torch.randint(0, V, (2, T), generator=torch.Generator().manual_seed(5))
    distill(small_student(seed=1), cache, blocks, ev, config=quick_cfg(tmp_path / "run", steps=4, batch_size=4))
    train, evals = rows(tmp_path / "run", "train"), rows(tmp_path / "run", "eval")
    assert len(train) == 4 and all(r["kd_loss"] > 0 for r in train) and train[-1]["kd_loss"] < train[0]["kd_loss"]
    assert evals and evals[-1]["lm_loss"] > 0  # student metrics only: no teacher for the eval data
    other = blocks.flip(0)
    for data, kw, match in ((other, {}, "built from other tokens"), (blocks, dict(top_k=4), "holds top_k=8, not 4"),
                            (blocks, dict(temperature=2.0), "built at temperature 1.0"),
                            (blocks, dict(logits_loss="reverse_kl"), "only forward_kl"),
                            (blocks, dict(intermediate_layers=[(0, 0)]), "intermediate_layers need the teacher")):
        with pytest.raises(ValueError, match=match):
            distill(small_student(seed=1), cache, data, config=quick_cfg(tmp_path / "bad", steps=1, **kw))
    with pytest.raises(ValueError, match="is not a teacher cache"):
        distill(small_student(seed=1), str(tmp_path), blocks, config=quick_cfg(tmp_path / "bad", steps=1))


def test_cli_teacher_logits_then_distill_from_the_cache(tmp_path, capsys):
    from minitron.cli import main
    from tests.helpers import rows

    from minitron.models import load_model

    teacher = "builtin-tiny"  # the 7M model shipped with minitron, and a perturbed copy as the student
    model, tok = load_model(teacher)
    with torch.no_grad():
        for q in model.parameters():
            q.add_(0.02 * torch.randn(q.shape, generator=torch.Generator().manual_seed(1)))
    student = tmp_path / "student"
    model.save_pretrained(student)
    tok.save_pretrained(student)
    vocab = model.get_output_embeddings().weight.shape[0]
    data = tmp_path / "train.pt"
    torch.save(torch.randint(1, vocab, (6, 16), generator=torch.Generator().manual_seed(0)), data)
    cache = tmp_path / "cache"
    assert main(["teacher-logits", "--teacher", teacher, "--data", str(data), "--top-k", "8",
                 "--out", str(cache)]) == 0
    info = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert info["tokens"] == 96 and info["bytes_per_token"] == 68 and (cache / MANIFEST).is_file()
    run = tmp_path / "run"
    common = ["--data", str(data), "--steps", "2", "--batch-size", "2", "--no-progress", "--no-plot",
              "--save-every", "0", "--eval-every", "0"]
    assert main(["distill", "--student", str(student), "--teacher-cache", str(cache), *common,
                 "--output-dir", str(run)]) == 0
    assert [r["kd_loss"] > 0 for r in rows(run, "train")] == [True, True]
    assert main(["distill", "--teacher-cache", str(cache), *common, "--output-dir", str(tmp_path / "r2")]) == 2
    assert "--teacher-cache needs --student" in capsys.readouterr().err
    other = tmp_path / "other.pt"
    torch.save(torch.randint(1, vocab, (6, 16), generator=torch.Generator().manual_seed(9)), other)
    assert main(["distill", "--student", str(student), "--teacher-cache", str(cache), *common[2:], "--data",
                 str(other), "--output-dir", str(tmp_path / "r3")]) == 2
    assert "built from other tokens" in capsys.readouterr().err


CACHED_DDP_SCRIPT = """
import sys, torch
from transformers import LlamaConfig, LlamaForCausalLM
from minitron.distillation import distill, DistillConfig

torch.set_num_threads(1)
torch.manual_seed(1)
student = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                       num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64))
data = torch.load(sys.argv[2])
distill(student, sys.argv[1], data, config=DistillConfig(steps=3, batch_size=4, grad_accum=2, lr=1e-2, warmup_steps=0,
        save_every=0, eval_every=0, output_dir=sys.argv[3], parallel=sys.argv[4], progress=False, plot=False,
        mixed_precision="fp32"))  # fp32: the all-reduce vs one-process sums are compared at rtol 1e-4
"""


def test_cached_distill_under_ddp_matches_one_process(tmp_path):
    """Each rank reads its own blocks' rows from the cache: 2 gloo processes train like one."""
    import os
    import subprocess
    import sys

    import torch.distributed as dist

    from tests.helpers import rows

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("needs gloo")
    blocks = torch.randint(0, V, (16, 16), generator=torch.Generator().manual_seed(0))
    torch.save(blocks, tmp_path / "data.pt")
    cache = cache_teacher_logits(tiny(seed=0), blocks, tmp_path / "cache", top_k=8)
    script = tmp_path / "run.py"
    script.write_text(CACHED_DDP_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    args = [str(script), str(cache), str(tmp_path / "data.pt")]
    one = subprocess.run([sys.executable, *args, str(tmp_path / "one"), "none"], env=env, capture_output=True,
                         text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args,
                          str(tmp_path / "two"), "ddp"], env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = rows(tmp_path / "one", "train"), rows(tmp_path / "two", "train")
    assert len(a) == len(b) == 3
    for x, y in zip(a, b):  # rtol 1e-4 as tests/test_distill_dist.py: fp32 all-reduce vs one-process sums
        assert y["kd_loss"] == pytest.approx(x["kd_loss"], rel=1e-4)
        assert y["grad_norm"] == pytest.approx(x["grad_norm"], rel=1e-4)
    assert a[0]["kd_loss"] != pytest.approx(a[-1]["kd_loss"], rel=1e-2)  # the steps trained
