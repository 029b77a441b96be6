"""Train the small built-in Llama model that `minitron`'s default job prunes.

No small pretrained causal LM ships inside an installable package, so minitron
ships its own: a GQA Llama (8 layers, hidden 256, 8 query / 4 KV heads, FFN 768,
tied embeddings, byte-level BPE vocabulary of 4096) trained from scratch on the
Python reference-manual text that CPython ships as ``pydoc_data.topics``
(copied to ``minitron/assets/pydoc_topics.txt``). The last 10% of that text is
held out and never used for training; it is the evaluation split.

Run (about 15-25 minutes on 2 CPU cores)::

    python tools/train_builtin_model.py --out minitron/assets/tiny-llama-pydoc
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

ASSETS = Path(__file__).resolve().parents[1] / "minitron" / "assets"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(ASSETS / "tiny-llama-pydoc"))
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    text = (ASSETS / "pydoc_topics.txt").read_text(encoding="utf-8")
    cut = int(len(text) * 0.9)
    train_text, valid_text = text[:cut], text[cut:]

    bpe = Tokenizer(models.BPE(unk_token=None))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=4096, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    bpe.train_from_iterator([train_text], trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    tokenizer.model_max_length = 512

    train_ids = torch.tensor(tokenizer(train_text)["input_ids"], dtype=torch.long)
    valid_ids = torch.tensor(tokenizer(valid_text)["input_ids"], dtype=torch.long)
    print(f"train tokens {train_ids.numel()}, valid tokens {valid_ids.numel()}")

    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=256, intermediate_size=768, num_hidden_layers=8,
        num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=512,
        tie_word_embeddings=True, bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
        rms_norm_eps=1e-5,
    )
    model = LlamaForCausalLM(config)
    print(f"params {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M")
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1, betas=(0.9, 0.95))
    warmup = 50

    def lr_at(step: int) -> float:
        if step < warmup:
            return args.lr * (step + 1) / warmup
        progress = (step - warmup) / max(1, args.steps - warmup)
        return 0.1 * args.lr + 0.9 * args.lr * 0.5 * (1 + math.cos(math.pi * progress))

    def evaluate() -> float:
        model.eval()
        n = (valid_ids.numel() - 1) // args.seq_len
        chunks = valid_ids[: n * args.seq_len].view(n, args.seq_len)
        total = 0.0
        with torch.no_grad():
            for i in range(0, n, 32):
                batch = chunks[i : i + 32]
                total += model(input_ids=batch, labels=batch).loss.item() * batch.shape[0]
        model.train()
        return total / n

    start = time.time()
    for step in range(args.steps):
        offsets = torch.randint(0, train_ids.numel() - args.seq_len - 1, (args.batch_size,))
        batch = torch.stack([train_ids[o : o + args.seq_len] for o in offsets.tolist()])
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 50 == 0 or step == args.steps - 1:
            msg = f"step {step} loss {loss.item():.3f} lr {lr_at(step):.2e} {time.time() - start:.0f}s"
            if step % 300 == 0 or step == args.steps - 1:
                msg += f" valid_loss {evaluate():.3f}"
            print(msg, flush=True)

    model = model.to(torch.bfloat16)
    model.config.dtype = torch.bfloat16
    model.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    print(f"saved to {args.out}")


if __name__ == "__main__":
    main()
