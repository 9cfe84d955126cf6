"""`python -m mpillama inspect MODEL --ranks N`: the header, the tensors and the slice plan."""

from __future__ import annotations

import dataclasses

from mpillama import partition
from mpillama.config import DEFAULTS
from mpillama.formats import open_model
from mpillama.formats.tensors import check_max_seq_len, type_name
from mpillama.weight_source import ffn_unit, group_tensors, kept_kinds


def mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


def describe(path: str, ranks: int, rank_weights: tuple[float, ...] | str | None, max_seq_len: int | None,
             weight_type: str, list_tensors: bool = False) -> str:
    if max_seq_len is not None:
        check_max_seq_len(max_seq_len)
    mf = open_model(path)
    cfg = mf.config
    lines = [f"{path} ({mf.format})"]
    for field in dataclasses.fields(cfg):
        lines.append(f"  {field.name:>16}: {getattr(cfg, field.name)}")
    kinds: dict[str, int] = {}
    for info in mf.tensors.values():
        kinds[info.kind] = kinds.get(info.kind, 0) + 1
    lines.append(f"  {'tensors':>16}: {len(mf.tensors)} (" + ", ".join(f"{k} {n}" for k, n in sorted(kinds.items())) + ")")
    if list_tensors:
        for name, info in mf.tensors.items():
            lines.append(f"    {name:<28} {info.kind:<6} {info.shape}")
    lines += kept_lines(mf, weight_type)
    kinds = kept_kinds(mf.tensors, weight_type)
    unit = ffn_unit(mf.tensors, weight_type)
    weights = None if rank_weights == "auto" else rank_weights
    seq = min(max_seq_len or DEFAULTS.max_seq_len, cfg.seq_len)
    slices = partition.plan(cfg, ranks, weights, unit)
    lines.append(f"slice plan for {ranks} rank(s), {weight_type} weights, KV cache at --max-seq-len {seq}:")
    lines.append(f"  {'rank':>4} {'share':>6} {'q heads':>9} {'kv heads':>9} {'ffn rows':>11} {'vocab rows':>15}"
                 f" {'weights':>12} {'kv cache':>12}")
    for s in slices:
        cost = partition.slice_cost(cfg, s, seq, weight_type, kinds)
        lines.append(
            f"  {s.rank:>4} {s.weight:>6.3f} {s.q_heads[0]:>4}-{s.q_heads[1]:<4} {s.kv_heads[0]:>4}-{s.kv_heads[1]:<4}"
            f" {s.ffn_rows[0]:>5}-{s.ffn_rows[1]:<5} {s.vocab_rows[0]:>7}-{s.vocab_rows[1]:<7}"
            f" {mib(cost.weight_bytes):>12} {mib(cost.kv_cache_bytes):>12}"
        )
    root = partition.slice_cost(cfg, slices[0], seq, weight_type, kinds).root_bytes
    if unit > partition.QK:
        lines.append(f"  FFN rows are shared in units of {unit}, not 32: ffn_down is kept as {kinds['ffn_down'].kind}, "
                     f"whose blocks of {unit} values its column slices must keep whole")
    stored = mf.tensors["token_embd"].kind
    where = "rows read in place from the mapped file, " if kinds["token_embd"].kind == stored.lower() else ""
    lines.append(f"  rank 0 also uses the embedding table and norms: {mib(root)} "
                 f"({where}every rank with --sync allreduce or replicated)")
    if ranks > 1:  # what the one-sync-per-layer option costs in memory
        rep = partition.slice_cost(cfg, partition.plan(cfg, ranks, weights, unit, replicate_attention=True)[0], seq,
                                   weight_type, kinds)
        split = partition.slice_cost(cfg, slices[0], seq, weight_type, kinds)
        lines.append(f"  with --sync replicated every rank holds all attention heads: rank 0 {mib(rep.weight_bytes)} "
                     f"of weights (+{100 * (rep.weight_bytes / split.weight_bytes - 1):.0f}%), KV cache "
                     f"{mib(rep.kv_cache_bytes)} (x{rep.kv_cache_bytes / split.kv_cache_bytes:.1f})")
    if cfg.is_moe:
        s0 = slices[0]
        expert = (2 * partition.matrix_bytes(s0.n_ffn_rows, cfg.dim, weight_type)
                  + partition.matrix_bytes(cfg.dim, s0.n_ffn_rows, weight_type))
        idle = cfg.n_layers * (cfg.n_experts - cfg.n_experts_used) * expert
        lines.append(f"  mixture of experts: every rank holds its ffn rows of all {cfg.n_experts} experts of "
                     f"each layer and the whole f32 router; a token reads {cfg.n_experts_used} experts: rank 0 about "
                     f"{mib(partition.slice_cost(cfg, s0, seq, weight_type).weight_bytes - idle)} of weights per token")
    if rank_weights == "auto":
        lines.append("  (--rank-weights auto is measured at start-up; shown here with even weights)")
    mf.close()
    return "\n".join(lines)


def kept_lines(mf: object, weight_type: str) -> list[str]:
    """Per matrix group: its stored type, what --weight-type keeps it as, and its bytes in memory (all layers)."""
    cfg, tensors = mf.config, mf.tensors  # type: ignore[attr-defined]
    kinds = kept_kinds(tensors, weight_type)
    head = "output" if "output" in tensors else "token_embd"
    groups = group_tensors(tensors)
    names = {**{g: [n.replace("blk.0.", "") for n in ns] for g, ns in groups.items()},
             "output": [head], "token_embd": ["token_embd"]}
    lines = [f"weights in memory with --weight-type {weight_type} (stored -> kept, whole model):"]
    for group, kept in kinds.items():
        layers = cfg.n_layers if group in groups else 1
        if cfg.is_moe and group in ("ffn_gate_up", "ffn_down"):
            layers *= cfg.n_experts  # the first expert's tensors stand for every expert's
        first = [f"blk.0.{n}" for n in names[group]] if group in groups else names[group]
        stored = sorted({type_name(tensors[n].kind, None) for n in first})
        n_bytes = layers * sum(partition.matrix_bytes(*tensors[n].shape, kept) for n in first)
        lines.append(f"  {group:>12}: {'/'.join(stored):>9} -> {kept.kind:<5} {mib(n_bytes):>12}"
                     f"  ({', '.join(names[group])})")
    return lines
