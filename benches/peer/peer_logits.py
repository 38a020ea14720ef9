#!/usr/bin/env python3
"""Reads a model exported by `kiln export --format safetensors` into the PyTorch reference model of
`peer_train.py` and prints its logits on a batch: the check that the exported file means, to
another framework, the model kiln trained.

Usage: `python3 benches/peer/peer_logits.py EXPORT_DIR BATCH.json`, where BATCH.json holds
`{"src": [[ids…]…], "tgt_in": [[ids…]…]}` (rows padded with the pad id). Prints
`{"shape": [rows, target positions, vocab], "logits": [...]}` on stdout.

The file is read without the `safetensors` package (its format is an 8-byte header length, a JSON
header, then the raw little-endian tensors), so the reference needs only torch. Burn stores a
linear layer's weight as [in, out]; torch.nn.Linear as [out, in]: each is transposed, as
`config.json`'s `linear_weight_layout` says. kiln's fused projections are cut where the
reference keeps them apart (the decoder's cross-attention keys and values).
"""

import json
import os
import struct
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from peer_train import Seq2Seq  # noqa: E402

DTYPES = {"F32": torch.float32, "F64": torch.float64, "F16": torch.float16, "BF16": torch.bfloat16}


def read_safetensors(path):
    with open(path, "rb") as f:
        raw = f.read()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    body = memoryview(raw)[8 + n :]
    tensors = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        start, end = meta["data_offsets"]
        t = torch.frombuffer(bytearray(body[start:end]), dtype=DTYPES[meta["dtype"]])
        tensors[name] = t.reshape(meta["shape"]).to(torch.float32)
    return tensors


def linear(module, w, b):
    """A Burn [in, out] weight and its bias into a torch.nn.Linear."""
    module.weight.data.copy_(w.t())
    module.bias.data.copy_(b)


def norm(module, t, prefix):
    module.weight.data.copy_(t[prefix + ".gamma"])
    module.bias.data.copy_(t[prefix + ".beta"])


def load(model, t, m):
    d = m["d_model"]
    used = set()
    get = lambda name: (used.add(name), t[name])[1]  # noqa: E731
    model.embedding.weight.data.copy_(get("embedding.weight"))
    if not m["tie_embeddings"]:
        model.target_embedding.weight.data.copy_(get("target_embedding.weight"))
        linear(model.output, get("output.weight"), get("output.bias"))
    if m["positions"] == "learned":
        model.positions.weight.data.copy_(get("positions.weight"))

    def self_part(layer, p):
        linear(layer.self_attn.qkv, get(p + "self_qkv.weight"), get(p + "self_qkv.bias"))
        linear(layer.self_attn.out, get(p + "self_out.weight"), get(p + "self_out.bias"))
        linear(layer.ff.inner, get(p + "ff_in.weight"), get(p + "ff_in.bias"))
        linear(layer.ff.outer, get(p + "ff_out.weight"), get(p + "ff_out.bias"))
        norm(layer.norms[0], t, p + "norm_self")
        norm(layer.norms[-1], t, p + "norm_ff")
        used.update(p + n for n in ["norm_self.gamma", "norm_self.beta", "norm_ff.gamma", "norm_ff.beta"])

    for i, layer in enumerate(model.encoder):
        self_part(layer, f"encoder.{i}.")
    for i, layer in enumerate(model.decoder):
        p = f"decoder.{i}."
        self_part(layer, p + "base.")
        a = layer.cross_attn
        linear(a.q, get(p + "cross_q.weight"), get(p + "cross_q.bias"))
        kv_w, kv_b = get(p + "cross_kv.weight"), get(p + "cross_kv.bias")
        linear(a.k, kv_w[:, :d], kv_b[:d])
        linear(a.v, kv_w[:, d:], kv_b[d:])
        linear(a.out, get(p + "cross_out.weight"), get(p + "cross_out.bias"))
        norm(layer.norms[1], t, p + "norm_cross")
        used.update([p + "norm_cross.gamma", p + "norm_cross.beta"])
    for name, module in [("encoder_norm", model.encoder_norm), ("decoder_norm", model.decoder_norm)]:
        if module is not None:
            norm(module, t, name)
            used.update([name + ".gamma", name + ".beta"])
    left = sorted(set(t) - used)
    if left:
        raise SystemExit(f"peer_logits: tensors the reference has no place for: {', '.join(left)}")


def main():
    export_dir, batch_path = sys.argv[1], sys.argv[2]
    with open(os.path.join(export_dir, "config.json")) as f:
        config = json.load(f)
    if config.get("family") != "transformer":
        raise SystemExit("peer_logits: the reference covers model.family = \"transformer\" only")
    m = config["model"]
    torch.manual_seed(0)
    model = Seq2Seq(m, config["vocab_size"], config["special_ids"]["pad"])
    load(model, read_safetensors(os.path.join(export_dir, "model.safetensors")), m)
    model.eval()
    with open(batch_path) as f:
        batch = json.load(f)
    src, tgt = torch.tensor(batch["src"]), torch.tensor(batch["tgt_in"])
    b, n = tgt.shape
    with torch.no_grad():
        logits = model.forward_rows(src, tgt, torch.arange(b * n))
    print(json.dumps({"shape": [b, n, logits.shape[-1]], "logits": logits.reshape(-1).tolist()}))


if __name__ == "__main__":
    main()
