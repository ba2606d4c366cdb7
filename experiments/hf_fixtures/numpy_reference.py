"""Independent numpy (float64) forward pass for the HF fixtures, written from the formulas in the
architecture notes, NOT from transformers. It reads config.json + safetensors directly and checks the
stored reference logits. An executable spec for the JAX importer.

    /work/venv-hf/bin/python experiments/hf_fixtures/numpy_reference.py   # needs numpy + safetensors only
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

FIX = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "hf"


def load_weights(d: Path) -> dict:
    idx = d / "model.safetensors.index.json"
    files = sorted(set(json.loads(idx.read_text())["weight_map"].values())) if idx.exists() else ["model.safetensors"]
    w = {}
    for f in files:
        w.update({k: v.astype(np.float64) for k, v in load_file(str(d / f)).items()})
    return w


def rope_params(cfg: dict) -> dict:
    rp = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
    rp.setdefault("rope_theta", cfg.get("rope_theta", 10000.0))
    rp.setdefault("rope_type", rp.get("type", "default"))
    if "partial_rotary_factor" in cfg:
        rp.setdefault("partial_rotary_factor", cfg["partial_rotary_factor"])
    return rp


def inv_freq(cfg: dict, head_dim: int, use_partial: bool) -> np.ndarray:
    rp = rope_params(cfg)
    frac = rp.get("partial_rotary_factor", 1.0) if use_partial or rp["rope_type"] == "llama3" else 1.0
    dim = int(head_dim * frac)
    inv = 1.0 / (rp["rope_theta"] ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    if rp["rope_type"] == "llama3":
        f, lo, hi = rp["factor"], rp["low_freq_factor"], rp["high_freq_factor"]
        old = rp.get("original_max_position_embeddings", cfg["max_position_embeddings"])
        low_wl, high_wl = old / lo, old / hi
        wl = 2 * math.pi / inv
        inv_l = np.where(wl > low_wl, inv / f, inv)
        s = (old / wl - lo) / (hi - lo)
        smoothed = (1 - s) * inv_l / f + s * inv_l
        medium = ~(wl < high_wl) & ~(wl > low_wl)
        inv = np.where(medium, smoothed, inv_l)
    else:
        assert rp["rope_type"] == "default", rp
    return inv


def rope(x, inv, pos):  # x [T, heads, D]; rotate_half convention on the first 2*len(inv) dims
    rot = 2 * len(inv)
    fr = pos[:, None] * inv[None, :]
    emb = np.concatenate([fr, fr], -1)
    cos, sin = np.cos(emb)[:, None, :], np.sin(emb)[:, None, :]
    xr, xp = x[..., :rot], x[..., rot:]
    half = rot // 2
    rh = np.concatenate([-xr[..., half:], xr[..., :half]], -1)
    return np.concatenate([xr * cos + rh * sin, xp], -1)


def rms(x, w, eps, one_plus):
    h = x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps)
    return h * ((1.0 + w) if one_plus else w)


def silu(x):
    return x / (1.0 + np.exp(-x))


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def softplus(x):
    return np.where(x > 20, x, np.log1p(np.exp(np.minimum(x, 20))))


def lin(x, w, p, bias=False):
    y = x @ w[p + ".weight"].T
    return y + w[p + ".bias"] if bias or (p + ".bias") in w else y


def attention(x, w, p, cfg, kind):
    T = x.shape[0]
    nH, nKV = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    D = cfg.get("head_dim") or cfg["hidden_size"] // nH
    eps = cfg["rms_norm_eps"]
    one_plus = kind in ("qwen3_5_text", "qwen3_next")
    qo = lin(x, w, p + ".q_proj")
    if one_plus:  # gated attention: per head [query D | gate D]
        qo = qo.reshape(T, nH, 2 * D)
        q, gate = qo[..., :D], qo[..., D:].reshape(T, nH * D)
    else:
        q, gate = qo.reshape(T, nH, D), None
    k = lin(x, w, p + ".k_proj").reshape(T, nKV, D)
    v = lin(x, w, p + ".v_proj").reshape(T, nKV, D)
    if p + ".q_norm.weight" in w:
        q = rms(q, w[p + ".q_norm.weight"], eps, one_plus)
        k = rms(k, w[p + ".k_norm.weight"], eps, one_plus)
    inv = inv_freq(cfg, D, use_partial=one_plus)
    pos = np.arange(T, dtype=np.float64)
    q, k = rope(q, inv, pos), rope(k, inv, pos)
    rep = nH // nKV
    k, v = np.repeat(k, rep, axis=1), np.repeat(v, rep, axis=1)  # kv head j -> q heads j*rep..j*rep+rep-1
    s = np.einsum("thd,shd->hts", q, k) * D**-0.5
    s = s + np.triu(np.full((T, T), -np.inf), 1)[None]
    a = np.exp(s - s.max(-1, keepdims=True))
    a /= a.sum(-1, keepdims=True)
    o = np.einsum("hts,shd->thd", a, v).reshape(T, nH * D)
    if gate is not None:
        o = o * sigmoid(gate)
    return lin(o, w, p + ".o_proj")


def gated_deltanet(x, w, p, cfg, kind):
    T, H = x.shape
    nk, nv = cfg["linear_num_key_heads"], cfg["linear_num_value_heads"]
    dk, dv = cfg["linear_key_head_dim"], cfg["linear_value_head_dim"]
    r = nv // nk
    if kind == "qwen3_next":  # fused, grouped by key head: [q dk | k dk | v r*dv | z r*dv] per key head
        W = w[p + ".in_proj_qkvz.weight"].reshape(nk, 2 * dk + 2 * r * dv, H)
        Wq = W[:, :dk].reshape(nk * dk, H)
        Wk = W[:, dk : 2 * dk].reshape(nk * dk, H)
        Wv = W[:, 2 * dk : 2 * dk + r * dv].reshape(nv * dv, H)
        Wz = W[:, 2 * dk + r * dv :].reshape(nv * dv, H)
        Wba = w[p + ".in_proj_ba.weight"].reshape(nk, 2 * r, H)
        Wb, Wa = Wba[:, :r].reshape(nv, H), Wba[:, r:].reshape(nv, H)
        Wqkv = np.concatenate([Wq, Wk, Wv], 0)
    else:
        Wqkv, Wz = w[p + ".in_proj_qkv.weight"], w[p + ".in_proj_z.weight"]
        Wb, Wa = w[p + ".in_proj_b.weight"], w[p + ".in_proj_a.weight"]
    mixed = x @ Wqkv.T  # [T, C]
    z = (x @ Wz.T).reshape(T, nv, dv)
    b, a = x @ Wb.T, x @ Wa.T
    cw = w[p + ".conv1d.weight"][:, 0, :]  # [C, K]
    K = cw.shape[1]
    padded = np.concatenate([np.zeros((K - 1, mixed.shape[1])), mixed], 0)
    conv = np.stack([(padded[t : t + K] * cw.T).sum(0) for t in range(T)], 0)
    conv = silu(conv)
    q = conv[:, : nk * dk].reshape(T, nk, dk)
    k = conv[:, nk * dk : 2 * nk * dk].reshape(T, nk, dk)
    v = conv[:, 2 * nk * dk :].reshape(T, nv, dv)
    beta = sigmoid(b)
    g = -np.exp(w[p + ".A_log"]) * softplus(a + w[p + ".dt_bias"])
    q, k = np.repeat(q, r, axis=1), np.repeat(k, r, axis=1)  # value head j uses key head j // r
    q = q / np.sqrt((q * q).sum(-1, keepdims=True) + 1e-6)
    k = k / np.sqrt((k * k).sum(-1, keepdims=True) + 1e-6)
    q = q * dk**-0.5
    S = np.zeros((nv, dk, dv))
    out = np.zeros((T, nv, dv))
    for t in range(T):
        S = S * np.exp(g[t])[:, None, None]
        kv = np.einsum("hk,hkv->hv", k[t], S)
        delta = (v[t] - kv) * beta[t][:, None]
        S = S + k[t][:, :, None] * delta[:, None, :]
        out[t] = np.einsum("hk,hkv->hv", q[t], S)
    h = rms(out, w[p + ".norm.weight"], cfg["rms_norm_eps"], one_plus=False) * silu(z)  # plain w, gated
    return h.reshape(T, nv * dv) @ w[p + ".out_proj.weight"].T


def mlp(x, w, p):
    return lin(silu(lin(x, w, p + ".gate_proj")) * lin(x, w, p + ".up_proj"), w, p + ".down_proj")


def moe(x, w, p, cfg):
    E, k = cfg["num_experts"], cfg["num_experts_per_tok"]
    logits = x @ w[p + ".gate.weight"].T
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    out = np.zeros_like(x)
    for t in range(x.shape[0]):
        top = np.argsort(-probs[t], kind="stable")[:k]
        wt = probs[t, top]
        if cfg.get("norm_topk_prob", True):
            wt = wt / wt.sum()
        for e, we in zip(top, wt):
            out[t] += we * mlp(x[t : t + 1], w, f"{p}.experts.{e}")[0]  # on-disk experts are unfused
    shared = mlp(x, w, p + ".shared_expert") * sigmoid(x @ w[p + ".shared_expert_gate.weight"].T)
    return out + shared


def forward(d: Path, ids: np.ndarray) -> np.ndarray:
    cfg = json.loads((d / "config.json").read_text())
    kind = cfg["model_type"]
    w = load_weights(d)
    one_plus = kind in ("qwen3_5_text", "qwen3_next")
    eps = cfg["rms_norm_eps"]
    L = cfg["num_hidden_layers"]
    types = cfg.get("layer_types") or ["full_attention"] * L
    emb = w["model.embed_tokens.weight"]
    head = w.get("lm_head.weight", emb) if not cfg.get("tie_word_embeddings") else emb
    outs = []
    for row in ids:
        x = emb[row]
        for l in range(L):
            p = f"model.layers.{l}"
            h = rms(x, w[p + ".input_layernorm.weight"], eps, one_plus)
            if types[l] == "linear_attention":
                x = x + gated_deltanet(h, w, p + ".linear_attn", cfg, kind)
            else:
                x = x + attention(h, w, p + ".self_attn", cfg, kind)
            h = rms(x, w[p + ".post_attention_layernorm.weight"], eps, one_plus)
            if p + ".mlp.gate.weight" in w:
                x = x + moe(h, w, p + ".mlp", cfg)
            else:
                x = x + mlp(h, w, p + ".mlp")
        outs.append(rms(x, w["model.norm.weight"], eps, one_plus) @ head.T)
    return np.stack(outs)


def greedy(d: Path, prompt: np.ndarray, n: int) -> np.ndarray:
    seq = list(prompt[0])
    for _ in range(n):
        seq.append(int(forward(d, np.asarray([seq]))[0, -1].argmax()))
    return np.asarray([seq])


def main():
    names = sys.argv[1:] or sorted(p.name for p in FIX.iterdir() if p.is_dir())
    ok = True
    for name in names:
        d = FIX / name
        ref = np.load(d / "reference.npz")
        lg = forward(d, ref["input_ids"])
        err = float(np.abs(lg - ref["logits"]).max())
        g = greedy(d, ref["prompt_ids"], ref["greedy_ids"].shape[1] - ref["prompt_ids"].shape[1])
        same = bool(np.array_equal(g, ref["greedy_ids"]))
        ok &= err < 1e-4 and same
        print(f"{name}: max|logits - ref| = {err:.2e}  greedy match = {same}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
