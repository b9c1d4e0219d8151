"""Ring attention: K/V blocks travel around the ring group while each rank attends its queries
to the block it holds; partial results merge by log-sum-exp in fp32 (LseAccumulator).
The next block's send/recv is posted before this block's compute, so they overlap.
Memory per rank, in units of its q (B, n, H, d): q, the K/V block being attended and the one
arriving (2 + 2, at the largest block's size), fp32 accumulators for every query (2 in bf16) and
the output (1): ring attention runs in one pass (block.py), so q, k and v of all this rank's
tokens exist too.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ltx2_tp.layers.attention_backend import LseAccumulator, attention_lse
from ltx2_tp.memory.plan import token_chunks
from ltx2_tp.profiling import nvtx_range


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_sizes: list[int], group,
                   q_chunk: int | None = None) -> torch.Tensor:
    """q, k, v (B, n_me, H, d) with n_me = block_sizes[rank]; returns (B, n_me, H, d)."""
    r, me = dist.get_world_size(group), dist.get_rank(group)
    b, n, h, d = k.shape
    nmax = max(block_sizes)
    cur = k.new_zeros(2, b, nmax, h, d)
    cur[0, :, :n], cur[1, :, :n] = k, v
    nxt = torch.empty_like(cur)
    send_to = dist.get_global_rank(group, (me + 1) % r)
    recv_from = dist.get_global_rank(group, (me - 1) % r)
    chunks = token_chunks(q.shape[1], q_chunk)
    accs = [LseAccumulator() for _ in chunks]
    for step in range(r):
        reqs = []
        if step < r - 1:
            with nvtx_range("ring_send_recv"):
                reqs = dist.batch_isend_irecv(
                    [dist.P2POp(dist.isend, cur, send_to, group), dist.P2POp(dist.irecv, nxt, recv_from, group)]
                )
        owner = (me - step) % r
        kb, vb = cur[0, :, : block_sizes[owner]], cur[1, :, : block_sizes[owner]]
        if block_sizes[owner]:
            for (s, e), acc in zip(chunks, accs):
                acc.add(*attention_lse(q[:, s:e], kb, vb))
        for req in reqs:
            req.wait()
        cur, nxt = nxt, cur
    out = q.new_empty(q.shape)
    for (s, e), acc in zip(chunks, accs):  # each fp32 accumulator freed once written (no fp32 concatenation)
        out[:, s:e] = acc.out
        acc.out = None
    return out
