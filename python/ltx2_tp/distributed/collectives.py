"""Every collective the model uses, named by what moves. Each is a no-op on a group of one.

Sequences split unevenly: part i of n tokens over p ranks has n // p + (i < n % p) tokens.
Ranks pad to the largest part for the collective and drop the padding after it, so padded
tokens never reach attention.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ltx2_tp.profiling import nvtx_range


def part_sizes(n: int, parts: int) -> list[int]:
    return [n // parts + (i < n % parts) for i in range(parts)]


def part_range(n: int, parts: int, index: int) -> tuple[int, int]:
    sizes = part_sizes(n, parts)
    start = sum(sizes[:index])
    return start, start + sizes[index]


def _size(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def all_reduce_sum(x: torch.Tensor, group) -> torch.Tensor:
    """Sum over `group` (TP partial sums of a row-parallel linear, qk-norm squares). Use the
    return value: a non-contiguous input is reduced in a contiguous copy, since the collective
    reads raw memory and ranks may hold the same shape with different strides."""
    return all_reduce_sum_start(x, group).wait()


class Pending:
    """A collective in flight: `wait()` returns its result. NCCL runs it on its own stream, so
    compute issued before `wait()` overlaps it; under torch.compile collectives are issued
    synchronously (the compiler schedules its own functional collectives)."""

    def __init__(self, work, finish):
        self.work, self.finish = work, finish

    def wait(self):
        if self.work is not None:
            self.work.wait()
        return self.finish()


def _issue(collective, *args, **kwargs):
    """Start `collective`: async in eager (returns its Work), blocking under torch.compile, whose
    traced collectives return tensors rather than Work (returns None)."""
    if torch.compiler.is_compiling():
        collective(*args, **kwargs)
        return None
    return collective(*args, async_op=True, **kwargs)


def all_reduce_sum_start(x: torch.Tensor, group) -> Pending:
    """all_reduce_sum, returned in flight (row-parallel outputs overlapped with the next chunk)."""
    if _size(group) == 1:
        return Pending(None, lambda: x)
    x = x.contiguous()
    with nvtx_range("all_reduce"):
        work = _issue(dist.all_reduce, x, op=dist.ReduceOp.SUM, group=group)
    return Pending(work, lambda: x)


def all_reduce_max(x: torch.Tensor, group) -> torch.Tensor:
    if _size(group) > 1:
        x = x.contiguous()
        dist.all_reduce(x, op=dist.ReduceOp.MAX, group=group)
    return x


def gather_sequence(x: torch.Tensor, sizes: list[int], group, dim: int = 1) -> torch.Tensor:
    """All-gather uneven sequence parts along `dim` (the model's outputs, T x out_channels)."""
    if _size(group) == 1:
        return x
    with nvtx_range("all_gather_sequence"):
        nmax = max(sizes)
        pad = list(x.shape)
        pad[dim] = nmax - x.shape[dim]
        xp = torch.cat([x, x.new_zeros(pad)], dim=dim).contiguous() if pad[dim] else x.contiguous()
        bufs = [torch.empty_like(xp) for _ in sizes]
        dist.all_gather(bufs, xp, group=group)
        return torch.cat([b.narrow(dim, 0, s) for b, s in zip(bufs, sizes)], dim=dim)


def gather_guidance_passes(x: torch.Tensor, group) -> torch.Tensor:
    """(k, L) -> (G, k, L): every guidance group's k pass outputs (latent-sized rows: video then
    audio, T x 128 channels each), the one collective of guidance parallelism per step."""
    g = _size(group)
    if g == 1:
        return x[None]
    x = x.contiguous()
    out = x.new_empty(g, *x.shape)
    with nvtx_range("all_gather_guidance"):
        dist.all_gather(list(out.unbind(0)), x, group=group)  # the list form: gloo and NCCL, torch 2.11-2.13
    return out


def ulysses_seq_to_heads(x: torch.Tensor, sizes: list[int], group) -> torch.Tensor:
    """(B, n_local, H, d) -> (B, sum(sizes), H / U, d): scatter heads, gather the sequence."""
    u = _size(group)
    if u == 1:
        return x
    return ulysses_seq_to_heads_packed_start(ulysses_pack(x, sizes, u)[0], sizes, group).wait()


def ulysses_pack(x: torch.Tensor, sizes: list[int], u: int, groups: int = 1) -> torch.Tensor:
    """(B, n_local, H, d) -> (G, U, B, nmax, H / (G U), d), contiguous: for each of G head groups,
    the heads each of the U ranks attends, padded to the largest part. Plain tensor ops, so
    inside a compiled block the copy fuses with the RoPE kernel that produces x."""
    b, n, h, d = x.shape
    nmax = max(sizes)
    if n < nmax:
        x = torch.cat([x, x.new_zeros(b, nmax - n, h, d)], dim=1)
    return x.view(b, nmax, groups, u, h // (groups * u), d).permute(2, 3, 0, 1, 4, 5).contiguous()


def ulysses_pack_kv(k: torch.Tensor, v: torch.Tensor, sizes: list[int], u: int, groups: int = 1) -> torch.Tensor:
    """k, v (B, n, H, d) -> (U, G, 2B, nmax, H / (G U), d), contiguous: for each of the U ranks, the
    keys (batch rows :B) and values (B:) of the heads it attends in each of G head groups, as
    ulysses_pack assigns them, padded to the largest part; rank-major, so one all-to-all moves all."""
    kv = torch.cat([k, v], dim=0)
    b2, n, h, d = kv.shape
    nmax = max(sizes)
    if n < nmax:
        kv = torch.cat([kv, kv.new_zeros(b2, nmax - n, h, d)], dim=1)
    return kv.view(b2, nmax, groups, u, h // (groups * u), d).permute(3, 2, 0, 1, 4, 5).contiguous()


def ulysses_exchange_start(send: torch.Tensor, group) -> Pending:
    """send (U, ...) -> in flight to recv (U, ...): recv[r] is what Ulysses rank r sent this rank
    (its tokens of this rank's heads; two-pass attention places them in the whole-sequence K/V)."""
    with nvtx_range("all_to_all_kv_to_heads"):
        recv = torch.empty_like(send)
        work = _issue(dist.all_to_all_single, recv, send, group=group)
    return Pending(work, lambda: recv)


def ulysses_unpack(recv: torch.Tensor, n_local: int) -> torch.Tensor:
    """(G, U, B, nmax, H / (G U), d) from ulysses_heads_to_seq_packed_start -> (B, n_local, H, d),
    the inverse of ulysses_pack (traced, like it: fuses with the output gate in a compiled block)."""
    g, u, b, nmax, hg, d = recv.shape
    return recv.permute(2, 3, 0, 1, 4, 5).reshape(b, nmax, g * u * hg, d)[:, :n_local]


def ulysses_seq_to_heads_packed_start(send: torch.Tensor, sizes: list[int], group) -> Pending:
    """send (U, B, nmax, hu, d) from ulysses_pack -> in flight to (B, sum(sizes), hu, d)."""
    u, b, nmax, hu, d = send.shape
    with nvtx_range("all_to_all_seq_to_heads"):
        recv = torch.empty_like(send)
        work = _issue(dist.all_to_all_single, recv, send, group=group)
    if b == 1 and len(set(sizes)) == 1:  # (U, 1, n, hu, d) is already (1, U*n, hu, d): no copy
        return Pending(work, lambda: recv.view(1, u * nmax, hu, d))
    return Pending(work, lambda: torch.cat([recv[i, :, : sizes[i]] for i in range(u)], dim=1))


def ulysses_heads_to_seq(x: torch.Tensor, sizes: list[int], group) -> torch.Tensor:
    """(B, sum(sizes), H / U, d) -> (B, n_local, H, d): the inverse of ulysses_seq_to_heads."""
    if _size(group) == 1:
        return x
    recv = ulysses_heads_to_seq_packed_start(x, sizes, group).wait()
    return ulysses_unpack(recv[None], sizes[dist.get_rank(group)])


def ulysses_heads_to_seq_packed_start(x: torch.Tensor, sizes: list[int], group,
                                      recv: torch.Tensor | None = None) -> Pending:
    """(B, sum(sizes), hu, d) -> in flight to recv (U, B, nmax, hu, d): from each rank, this rank's
    tokens of that rank's heads (ulysses_unpack puts them in place). `recv` may be given (a slice of
    one buffer for all head groups)."""
    u = _size(group)
    with nvtx_range("all_to_all_heads_to_seq"):
        b, _, hu, d = x.shape
        nmax = max(sizes)
        if b == 1 and len(set(sizes)) == 1:  # (1, U*n, hu, d) is (U, 1, n, hu, d): at most one copy
            send = x.reshape(u, 1, nmax, hu, d).contiguous()
        else:
            send = x.new_zeros(u, b, nmax, hu, d)
            start = 0
            for i, s in enumerate(sizes):
                send[i, :, :s] = x[:, start : start + s]
                start += s
        recv = torch.empty_like(send) if recv is None else recv
        work = _issue(dist.all_to_all_single, recv, send, group=group)
    return Pending(work, lambda: recv)
