#!/usr/bin/env python3
"""PyTorch reference for `kiln bench train`: the same encoder-decoder Transformer or GPT-style
language model, trained on the same batches in the same order, with the same loss, optimizer,
clipping and thread count, timed the same way (steady-state target tokens per second after a
warm-up); eager, or with `--compile` (`torch.compile` of the model, its compilation in the
warm-up steps).

kiln writes the batches and the recipe's settings to a JSON file; this script reads it, trains,
and prints one JSON object on stdout. It is run by the bench, not by hand (but it can be:
`python3 benches/peer/peer_train.py batches.json`).

What matches kiln (crates/kiln-model/src/seq2seq.rs): pre-LN or post-LN layers with a final
LayerNorm after each pre-LN stack; one embedding tied across encoder input, decoder input and
output projection (or separate ones); embeddings scaled by sqrt(d) and initialised N(0, d^-1/2);
sinusoidal or learned positions; dropout on embeddings, attention probabilities, residual
branches (not inside the feed-forward); one fused query/key/value product for self-attention; the output layer runs only on labelled positions;
label-smoothed cross-entropy summed over tokens and divided by the step's target tokens; AdamW;
global-norm clipping; the learning-rate schedule.

The language model (crates/kiln-model/src/lm.rs), GPT-2 / nanoGPT style: token embedding
N(0, 0.02) tied with the output layer (or not), learned (N(0, 0.02)), sinusoidal or rotary
positions, pre-LN blocks of causal self-attention (one fused query/key/value product) and a GELU
(or ReLU) MLP, dropout on the embeddings, attention probabilities and residual branches, a final
LayerNorm, the output layer on labelled positions only. Attention uses
`F.scaled_dot_product_attention`, PyTorch's own fused path: the reference is PyTorch as a user
would write it today, not a copy of kiln's composition.
"""

import argparse
import json
import math
import statistics
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


def sinusoids(length, d):
    pos = torch.arange(length, dtype=torch.float32).unsqueeze(1)
    div = torch.exp(torch.arange(0, d, 2, dtype=torch.float32) * (-math.log(10000.0) / d))
    table = torch.zeros(length, d)
    table[:, 0::2] = torch.sin(pos * div)
    table[:, 1::2] = torch.cos(pos * div)
    return table


class Attention(nn.Module):
    def __init__(self, d, heads, dropout, fused_qkv):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.fused_qkv = fused_qkv
        if fused_qkv:
            self.qkv = nn.Linear(d, 3 * d)
        else:
            self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.out = nn.Linear(d, d)

    def split(self, x):
        b, n, d = x.shape
        return x.view(b, n, self.heads, d // self.heads).transpose(1, 2)

    def forward(self, x, memory=None, mask=None):
        if memory is None and self.fused_qkv:
            q, k, v = self.qkv(x).chunk(3, dim=-1)
        elif memory is None:
            q, k, v = self.q(x), self.k(x), self.v(x)
        else:
            q, k, v = self.q(x), self.k(memory), self.v(memory)
        q, k, v = self.split(q), self.split(k), self.split(v)
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        b, h, n, hd = y.shape
        return self.out(y.transpose(1, 2).reshape(b, n, h * hd))


class FeedForward(nn.Module):
    def __init__(self, d, d_ff, dropout, relu):
        super().__init__()
        self.inner, self.outer = nn.Linear(d, d_ff), nn.Linear(d_ff, d)
        self.drop = nn.Dropout(dropout)
        self.act = F.relu if relu else F.gelu

    def forward(self, x):
        return self.outer(self.drop(self.act(self.inner(x))))


class Layer(nn.Module):
    """An encoder layer (self-attention, feed-forward) or a decoder layer (+ cross-attention)."""

    def __init__(self, m, decoder):
        super().__init__()
        d = m["d_model"]
        self.pre_ln = m["pre_ln"]
        self.self_attn = Attention(d, m["n_heads"], m["dropout"], fused_qkv=True)
        self.cross_attn = Attention(d, m["n_heads"], m["dropout"], fused_qkv=False) if decoder else None
        # kiln's layers drop out after each sub-layer, not inside the feed-forward.
        self.ff = FeedForward(d, m["d_ff"], 0.0, m["activation"] == "relu")
        self.norms = nn.ModuleList([nn.LayerNorm(d) for _ in range(3 if decoder else 2)])
        self.drop = nn.Dropout(m["dropout"])

    def sub(self, x, norm, f):
        if self.pre_ln:
            return x + self.drop(f(norm(x)))
        return norm(x + self.drop(f(x)))

    def forward(self, x, self_mask, memory=None, cross_mask=None):
        x = self.sub(x, self.norms[0], lambda h: self.self_attn(h, mask=self_mask))
        if self.cross_attn is not None:
            x = self.sub(x, self.norms[1], lambda h: self.cross_attn(h, memory=memory, mask=cross_mask))
        return self.sub(x, self.norms[-1], self.ff)


class Seq2Seq(nn.Module):
    def __init__(self, m, vocab, pad):
        super().__init__()
        d = m["d_model"]
        self.d, self.pad = d, pad
        self.embedding = nn.Embedding(vocab, d)
        nn.init.normal_(self.embedding.weight, 0.0, d ** -0.5)
        self.tied = m["tie_embeddings"]
        if not self.tied:
            self.target_embedding = nn.Embedding(vocab, d)
            nn.init.normal_(self.target_embedding.weight, 0.0, d ** -0.5)
            self.output = nn.Linear(d, vocab)
        if m["positions"] == "learned":
            self.positions = nn.Embedding(m["max_positions"], d)
            nn.init.normal_(self.positions.weight, 0.0, d ** -0.5)
        else:
            self.register_buffer("sinusoids", sinusoids(m["max_positions"], d), persistent=False)
            self.positions = None
        self.encoder = nn.ModuleList([Layer(m, decoder=False) for _ in range(m["encoder_layers"])])
        self.decoder = nn.ModuleList([Layer(m, decoder=True) for _ in range(m["decoder_layers"])])
        self.encoder_norm = nn.LayerNorm(d) if m["pre_ln"] else None
        self.decoder_norm = nn.LayerNorm(d) if m["pre_ln"] else None
        self.drop = nn.Dropout(m["dropout"])

    def embed(self, table, tokens):
        n = tokens.shape[1]
        x = table(tokens) * math.sqrt(self.d)
        x = x + (self.positions.weight[:n] if self.positions is not None else self.sinusoids[:n])
        return self.drop(x)

    def forward_rows(self, src, tgt_in, rows):
        b, s = src.shape
        t = tgt_in.shape[1]
        # Boolean masks: True = may attend (scaled_dot_product_attention's convention).
        src_ok = (src != self.pad).view(b, 1, 1, s)
        x = self.embed(self.embedding, src)
        for layer in self.encoder:
            x = layer(x, src_ok)
        memory = self.encoder_norm(x) if self.encoder_norm is not None else x
        causal = torch.ones(t, t, dtype=torch.bool).tril().view(1, 1, t, t)
        y = self.embed(self.embedding if self.tied else self.target_embedding, tgt_in)
        for layer in self.decoder:
            y = layer(y, causal, memory, src_ok)
        states = y.reshape(b * t, self.d).index_select(0, rows)
        if self.decoder_norm is not None:
            states = self.decoder_norm(states)
        return states @ self.embedding.weight.t() if self.tied else self.output(states)


def rotate(x, table):
    """Rotary positions on `[b, h, n, hd]`: pairs (2i, 2i+1) turned by position × θ_i."""
    n = x.shape[2]
    cos, sin = table[0][:n], table[1][:n]
    even, odd = x[..., 0::2], x[..., 1::2]
    return torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1).flatten(-2)


def rotary_table(length, hd):
    theta = 10000.0 ** (-torch.arange(0, hd, 2, dtype=torch.float32) / hd)
    angles = torch.arange(length, dtype=torch.float32).unsqueeze(1) * theta
    return torch.stack((angles.cos(), angles.sin()))


class Block(nn.Module):
    def __init__(self, m):
        super().__init__()
        d = m["d_model"]
        self.heads, self.dropout = m["n_heads"], m["dropout"]
        self.norm_attn, self.norm_mlp = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.attn_out = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.mlp_in, self.mlp_out = nn.Linear(d, m["d_ff"]), nn.Linear(m["d_ff"], d)
        self.act = F.relu if m["activation"] == "relu" else F.gelu
        self.drop = nn.Dropout(m["dropout"])

    def forward(self, x, rope):
        b, n, d = x.shape
        q, k, v = self.qkv(self.norm_attn(x)).split(d, dim=-1)
        q, k, v = (t.view(b, n, self.heads, d // self.heads).transpose(1, 2) for t in (q, k, v))
        if rope is not None:
            q, k = rotate(q, rope), rotate(k, rope)
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=p)
        x = x + self.drop(self.attn_out(y.transpose(1, 2).reshape(b, n, d)))
        return x + self.drop(self.mlp_out(self.act(self.mlp_in(self.norm_mlp(x)))))


class Gpt(nn.Module):
    def __init__(self, m, vocab):
        super().__init__()
        d = m["d_model"]
        self.d = d
        self.embedding = nn.Embedding(vocab, d)
        nn.init.normal_(self.embedding.weight, 0.0, 0.02)
        self.output = None if m["tie_embeddings"] else nn.Linear(d, vocab)
        self.positions, self.rope = None, None
        if m["positions"] == "learned":
            self.positions = nn.Embedding(m["max_positions"], d)
            nn.init.normal_(self.positions.weight, 0.0, 0.02)
        elif m["positions"] == "rotary":
            self.register_buffer("rope", rotary_table(m["max_positions"], d // m["n_heads"]), persistent=False)
        else:
            self.register_buffer("sinusoids", sinusoids(m["max_positions"], d), persistent=False)
        self.blocks = nn.ModuleList([Block(m) for _ in range(m["decoder_layers"])])
        self.final_norm = nn.LayerNorm(d)
        self.drop = nn.Dropout(m["dropout"])
        self.sinusoidal = m["positions"] == "sinusoidal"

    def forward_rows(self, tokens, rows):
        b, n = tokens.shape
        x = self.embedding(tokens)
        if self.positions is not None:
            x = x + self.positions.weight[:n]
        elif self.sinusoidal:
            x = x + self.sinusoids[:n]
        x = self.drop(x)
        for block in self.blocks:
            x = block(x, self.rope)
        states = self.final_norm(x).reshape(b * n, self.d).index_select(0, rows)
        return self.output(states) if self.output is not None else states @ self.embedding.weight.t()


def lr_at(tr, step, total):
    s, w, peak = max(step, 1), tr["warmup_steps"], tr["lr"]
    if w > 0 and step <= w:
        return peak * s / w
    if tr["schedule"] == "constant":
        return peak
    if tr["schedule"] == "inverse_sqrt":
        return peak * math.sqrt(max(w, 1) / s)
    span = max(total - w, 1)
    progress = min(max((s - w) / span, 0.0), 1.0)
    return tr["min_lr"] + 0.5 * (peak - tr["min_lr"]) * (1 + math.cos(math.pi * progress))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("batches", help="the JSON file kiln's bench wrote")
    ap.add_argument("--compile", action="store_true", help="torch.compile the model (compiled during the warm-up steps)")
    args = ap.parse_args()
    with open(args.batches) as f:
        spec = json.load(f)
    threads, warmup = spec["threads"], spec["warmup_steps"]
    torch.set_num_threads(threads)
    torch.manual_seed(spec["seed"])
    m, tr = spec["model"], spec["train"]
    lm = spec.get("family") == "lm"
    model = Gpt(m, spec["vocab_size"]) if lm else Seq2Seq(m, spec["vocab_size"], spec["pad"])
    model.train()
    forward = model.forward_rows
    if args.compile:
        forward = torch.compile(model.forward_rows)
    # Biases and norms decay too: Burn's AdamW applies weight decay to every parameter.
    optim = torch.optim.AdamW(model.parameters(), lr=tr["lr"], betas=(tr["beta1"], tr["beta2"]), eps=tr["eps"], weight_decay=tr["weight_decay"])
    total = len(spec["steps"])

    def tensor(values, shape):
        return torch.tensor(values, dtype=torch.long).view(*shape)

    def inputs(b):
        if lm:
            return (tensor(b["input"], b["input_shape"]),)
        return (tensor(b["src"], b["src_shape"]), tensor(b["tgt_in"], b["tgt_shape"]))

    steps = [
        [(inputs(b), torch.tensor(b["label_rows"], dtype=torch.long), torch.tensor(b["labels"], dtype=torch.long)) for b in step]
        for step in spec["steps"]
    ]
    step_ms, tokens, losses = [], [], []
    loss_window = torch.zeros(())
    for i, batches in enumerate(steps):
        t0 = time.perf_counter()
        step_tokens = sum(int(b[2].numel()) for b in batches)
        optim.zero_grad(set_to_none=True)
        for tensors, rows, labels in batches:
            logits = forward(*tensors, rows)
            loss = F.cross_entropy(logits, labels, reduction="sum", label_smoothing=tr["label_smoothing"])
            (loss / step_tokens).backward()
            loss_window += loss.detach()
        if tr["clip_norm"] > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), tr["clip_norm"])
        for group in optim.param_groups:
            group["lr"] = lr_at(tr, i + 1, total)
        optim.step()
        if (i + 1) % spec["sync_interval"] == 0 or i + 1 == total:
            losses.append(float(loss_window))  # the window's one read, as kiln does
            loss_window = torch.zeros(())
        step_ms.append((time.perf_counter() - t0) * 1e3)
        tokens.append(step_tokens)
    measured = list(range(warmup, total))
    secs = sum(step_ms[i] for i in measured) / 1e3
    ms = sorted(step_ms[i] for i in measured)
    out = {
        "torch": torch.__version__,
        "mode": "compile" if args.compile else "eager",
        "threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "steps": len(measured),
        "tokens_per_s": sum(tokens[i] for i in measured) / secs if secs > 0 else 0.0,
        "step_ms_median": statistics.median(ms) if ms else 0.0,
        "step_ms_p90": ms[min(len(ms) - 1, int(0.9 * len(ms)))] if ms else 0.0,
        "first_window_loss_sum": losses[0] if losses else None,
    }
    json.dump(out, sys.stdout)
    print()


if __name__ == "__main__":
    main()
