"""An independent float32 reference forward pass, for checking mpillama's logits.

Plain numpy, in the style of llama2.c: it reads the GGUF with the `gguf` package alone
(dequantizing with gguf.quants), recomputes the whole sequence for every new token (no KV
cache), and shares no code with mpillama's model.py, kernels/ or formats/.
"""

from __future__ import annotations

from dataclasses import dataclass

import gguf
import numpy as np


@dataclass
class RefModel:
    arch: str
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    eps: float
    theta: float
    scaling: dict | None
    halves: bool
    w: dict[str, np.ndarray]  # name -> f32 array in math orientation (out, in); experts (n_expert, out, in)
    n_experts_used: int = 0  # qwen3moe: experts per token (0: dense FFN)


def _field(reader: gguf.GGUFReader, key: str, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    value = f.parts[f.data[0]]
    if f.types[0] == gguf.GGUFValueType.STRING:
        return bytes(value).decode()
    return value.tolist()[0] if hasattr(value, "tolist") else value


def load(path: str) -> RefModel:
    r = gguf.GGUFReader(path)
    arch = _field(r, "general.architecture")
    w = {}
    for t in r.tensors:
        name = t.name.removesuffix(".weight")
        shape = tuple(int(x) for x in reversed(t.shape.tolist()))  # GGUF ne is (in, out)
        data = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        w[name] = data.reshape(shape)
    n_heads = _field(r, f"{arch}.attention.head_count")
    dim = _field(r, f"{arch}.embedding_length")
    head_dim = _field(r, f"{arch}.attention.key_length", dim // n_heads)
    factor = _field(r, f"{arch}.rope.scaling.factor")
    scaling = None
    if factor is not None and _field(r, f"{arch}.rope.scaling.type", "llama3") in ("llama3", None) and factor != 1.0:
        scaling = {
            "factor": factor,
            "low": _field(r, f"{arch}.rope.scaling.low_freq_factor", 1.0),
            "high": _field(r, f"{arch}.rope.scaling.high_freq_factor", 4.0),
            "orig": _field(r, f"{arch}.rope.scaling.original_context_length", 8192),
        }
    return RefModel(
        arch=arch,
        n_layers=_field(r, f"{arch}.block_count"),
        n_heads=n_heads,
        n_kv_heads=_field(r, f"{arch}.attention.head_count_kv"),
        head_dim=head_dim,
        eps=_field(r, f"{arch}.attention.layer_norm_rms_epsilon"),
        theta=_field(r, f"{arch}.rope.freq_base", 10000.0),
        scaling=scaling,
        halves=arch != "llama",
        w=w,
        n_experts_used=_field(r, f"{arch}.expert_used_count", 0),
    )


def rmsnorm(x: np.ndarray, g: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * g


def frequencies(m: RefModel) -> np.ndarray:
    hd = m.head_dim
    freqs = 1.0 / (m.theta ** (np.arange(0, hd, 2, dtype=np.float64) / hd))
    if m.scaling:
        s = m.scaling
        low_wavelen = s["orig"] / s["low"]
        high_wavelen = s["orig"] / s["high"]
        out = []
        for f in freqs:
            wavelen = 2 * np.pi / f
            if wavelen < high_wavelen:
                out.append(f)
            elif wavelen > low_wavelen:
                out.append(f / s["factor"])
            else:
                smooth = (s["orig"] / wavelen - s["low"]) / (s["high"] - s["low"])
                out.append((1 - smooth) * f / s["factor"] + smooth * f)
        freqs = np.array(out)
    if "rope_freqs" in m.w:  # llama.cpp's form of Llama 3.1 scaling: a divisor per frequency
        freqs = freqs / m.w["rope_freqs"].astype(np.float64)
    return freqs


def rotate(x: np.ndarray, positions: np.ndarray, m: RefModel) -> np.ndarray:
    """x (T, heads, hd) rotated by position; pairs (2i, 2i+1) or halves (i, i + hd/2)."""
    angles = positions[:, None].astype(np.float64) * frequencies(m)[None, :]  # (T, hd/2)
    cos = np.cos(angles)[:, None, :]
    sin = np.sin(angles)[:, None, :]
    x = x.astype(np.float64)
    if m.halves:
        a, b = x[..., : m.head_dim // 2], x[..., m.head_dim // 2 :]
        return np.concatenate([a * cos - b * sin, a * sin + b * cos], axis=-1).astype(np.float32)
    a, b = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2] = a * cos - b * sin
    out[..., 1::2] = a * sin + b * cos
    return out.astype(np.float32)


def forward(m: RefModel, tokens: list[int]) -> np.ndarray:
    """Logits (T, vocab) for every position of the sequence."""
    w, hd = m.w, m.head_dim
    T = len(tokens)
    x = w["token_embd"][np.array(tokens)]  # (T, dim)
    pos = np.arange(T)
    mask = np.triu(np.full((T, T), -np.inf, dtype=np.float32), k=1)
    group = m.n_heads // m.n_kv_heads
    for i in range(m.n_layers):
        p = f"blk.{i}."
        y = rmsnorm(x, w[p + "attn_norm"], m.eps)
        q = (y @ w[p + "attn_q"].T).reshape(T, m.n_heads, hd)
        k = (y @ w[p + "attn_k"].T).reshape(T, m.n_kv_heads, hd)
        v = (y @ w[p + "attn_v"].T).reshape(T, m.n_kv_heads, hd)
        if p + "attn_q_norm" in w:
            q = rmsnorm(q, w[p + "attn_q_norm"], m.eps)
            k = rmsnorm(k, w[p + "attn_k_norm"], m.eps)
        q, k = rotate(q, pos, m), rotate(k, pos, m)
        out = np.empty((T, m.n_heads, hd), dtype=np.float32)
        for h in range(m.n_heads):
            scores = q[:, h] @ k[:, h // group].T / np.sqrt(hd) + mask  # (T, T)
            scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
            scores /= scores.sum(axis=-1, keepdims=True)
            out[:, h] = scores @ v[:, h // group]
        x = x + out.reshape(T, -1) @ w[p + "attn_output"].T
        y = rmsnorm(x, w[p + "ffn_norm"], m.eps)
        x = x + (moe_ffn(m, p, y) if m.n_experts_used else swiglu_ffn(y, w[p + "ffn_gate"], w[p + "ffn_up"],
                                                                        w[p + "ffn_down"]))
    x = rmsnorm(x, w["output_norm"], m.eps)
    head = w.get("output", w["token_embd"])
    return (x @ head.T).astype(np.float32)


def swiglu_ffn(y: np.ndarray, gate: np.ndarray, up: np.ndarray, down: np.ndarray) -> np.ndarray:
    g = y @ gate.T
    u = y @ up.T
    return (g / (1 + np.exp(-g)) * u) @ down.T


def moe_ffn(m: RefModel, p: str, y: np.ndarray) -> np.ndarray:
    """Qwen3 MoE, token by token as Hugging Face's Qwen3MoeSparseMoeBlock: softmax over the router's
    logits, the top k, renormalised to sum to 1, the weighted sum of those experts' SwiGLU outputs."""
    w, k = m.w, m.n_experts_used
    out = np.zeros_like(y)
    for t in range(y.shape[0]):
        logits = w[p + "ffn_gate_inp"].astype(np.float64) @ y[t].astype(np.float64)  # (n_expert,)
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        chosen = np.argsort(-probs, kind="stable")[:k]
        weights = probs[chosen] / probs[chosen].sum()
        for e, p_e in zip(chosen, weights):
            out[t] += p_e * swiglu_ffn(y[t : t + 1], w[p + "ffn_gate_exps"][e], w[p + "ffn_up_exps"][e],
                                       w[p + "ffn_down_exps"][e])[0]
    return out


def greedy(m: RefModel, prompt: list[int], steps: int) -> tuple[list[int], np.ndarray]:
    """Greedy tokens and the logits row each was chosen from (steps, vocab)."""
    tokens = list(prompt)
    rows = []
    for _ in range(steps):
        logits = forward(m, tokens)[-1]
        rows.append(logits)
        tokens.append(int(np.argmax(logits)))
    return tokens[len(prompt) :], np.stack(rows)
