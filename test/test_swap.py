"""Block swap (memory/swap.py): streamed blocks give the resident model's output bit for bit.

On the CPU the "device slots" are CPU tensors and copies are synchronous; the ordering the GPU
relies on (a copy waits for the slot's last user, a block waits for its copy) is checked on the
swapper's recorded schedule instead.
"""

from __future__ import annotations

import pytest
import torch
from reference import make_inputs, tiny_config
from torch._dynamo.testing import CompileCounterWithBackend

from ltx2_tp.compile import compile_blocks
from ltx2_tp.layers.fp8 import quantize_fp8
from ltx2_tp.memory.swap import (block_nbytes, build_swapped_model, device_nbytes, disable_block_swap,
                                 enable_block_swap, spread_blocks)
from ltx2_tp.models.ltx2.lora import LoraWeights, lora_applied
from ltx2_tp.models.ltx2.weights import build_model, checkpoint_spec, official_state_dict, save_checkpoint

LAYERS = 5  # enough blocks that both slots are reused within one forward


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: one intra-op thread is faster than two fighting (and over 10x so on a shared machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _cfg():
    return tiny_config(num_layers=LAYERS)


def _same(out, ref) -> None:
    for o, r in zip(out, ref):
        assert o.dtype == r.dtype and torch.equal(o, r), (o - r).abs().max()


def _checkpoint(tmp_path, dtype, seed=3):
    cfg = _cfg()
    path = tmp_path / "dit.safetensors"
    save_checkpoint(official_state_dict(build_model(cfg, dtype=dtype, seed=seed)), path)
    return cfg, [str(path)]


def check_schedule(trace: list[tuple], streamed_per_forward: int, forwards: int, prefetch: bool) -> None:
    """The host-side order that makes the GPU's safe: a slot is copied into only while no block
    runs from it and after the event of its last user; a block runs from the slot its copy went to;
    with `prefetch`, streamed block j+1's copy is issued before block j runs."""
    running, holds, last_user = {}, {}, {}
    copied_at, run_at = [], []
    for n, ev in enumerate(trace):
        if ev[0] == "copy":
            _, b, s, after = ev
            assert s not in running, f"copy of block {b} into slot {s} while block {running.get(s)} runs from it"
            assert after == last_user.get(s), f"copy of block {b} waits for block {after}, slot {s}'s last user is {last_user.get(s)}"
            holds[s] = b
            copied_at.append(n)
        elif ev[0] == "run":
            _, b, s = ev
            assert holds.get(s) == b, f"block {b} runs from slot {s}, which holds block {holds.get(s)}"
            running[s] = b
            run_at.append(n)
        else:
            _, b, s = ev
            assert running.pop(s) == b
            last_user[s] = b
    assert len(copied_at) == len(run_at) == streamed_per_forward * forwards
    if prefetch:
        for j in range(len(run_at)):
            if (j + 1) % streamed_per_forward:  # not the last streamed block of a forward
                assert copied_at[j + 1] < run_at[j], "the next block's copy must be under way before a block runs"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("source", ["host", "file"])
def test_streamed_equals_resident(tmp_path, dtype, source):
    cfg, files = _checkpoint(tmp_path, dtype)
    v, a = make_inputs(cfg, dtype=dtype)
    ref = build_model(cfg, dtype=dtype, files=files)
    rv = ref(v, a)
    for resident in (0, 2, {1, 3}):  # all streamed; first two resident; resident between streamed ones
        model = build_model(cfg, dtype=dtype, files=files)
        swap = enable_block_swap(model, resident, source=source, files=files, trace=True)
        for _ in range(2):  # the second forward reuses slots last used by the first
            _same(model(v, a), rv)
        n = LAYERS - len(swap.resident)
        check_schedule(swap.trace, n, 2, prefetch=source == "host")
        assert swap.block_nbytes == block_nbytes(ref.transformer_blocks[0])
        assert swap.device_nbytes == device_nbytes(ref, resident) == (LAYERS - n + 2) * swap.block_nbytes
        assert swap.host_nbytes == (n if source == "host" else 2) * swap.block_nbytes
        for i in swap.streamed:  # nothing of a streamed block stays on the device between forwards
            t = model.transformer_blocks[i].ff.net[0].proj.weight
            assert t.untyped_storage().data_ptr() not in {b.untyped_storage().data_ptr() for b in swap._slot_bufs}
        disable_block_swap(model)
        _same(model(v, a), rv)
        sd, rsd = official_state_dict(model), official_state_dict(ref)
        assert sd.keys() == rsd.keys() and all(torch.equal(sd[k], rsd[k]) for k in rsd)


@pytest.mark.parametrize("slots", [1, 3])
def test_schedule_other_slot_counts(slots):
    cfg = tiny_config(num_layers=7)
    model = build_model(cfg, dtype=torch.float32, seed=5)
    v, a = make_inputs(cfg)
    rv = model(v, a)
    swap = enable_block_swap(model, {2, 5}, slots=slots, trace=True)
    for _ in range(3):
        _same(model(v, a), rv)
    check_schedule(swap.trace, 5, 3, prefetch=slots > 1)


def test_stopped_forward_leaves_the_model_usable():
    cfg = _cfg()
    model = build_model(cfg, dtype=torch.float32, seed=5)
    v, a = make_inputs(cfg)
    rv = model(v, a)
    swap = enable_block_swap(model, 1, trace=True)
    block = model.transformer_blocks[3]
    real = block.forward
    block.forward = lambda *args: (_ for _ in ()).throw(RuntimeError("boom"))
    with pytest.raises(RuntimeError, match="boom"):
        model(v, a)
    block.forward = real
    assert not torch.isnan(block.ff.net[0].proj.weight).any()  # pointed home again
    _same(model(v, a), rv)


def test_build_swapped_model_equals_resident(tmp_path):
    """Streamed blocks built straight into host memory: random init (same seed, same weights) and
    from the checkpoint, read now (host) or at each use (file)."""
    cfg, files = _checkpoint(tmp_path, torch.bfloat16, seed=4)
    v, a = make_inputs(cfg, dtype=torch.bfloat16)
    ref = build_model(cfg, seed=4)
    rv = ref(v, a)
    for kw in (dict(seed=4), dict(files=files), dict(files=files, source="file")):
        model = build_swapped_model(cfg, resident_blocks={0, 3}, **kw)
        _same(model(v, a), rv)
    model = build_swapped_model(cfg, seed=4, resident_blocks=2)
    sd, rsd = official_state_dict(model), official_state_dict(ref)
    assert all(torch.equal(sd[k], rsd[k]) for k in rsd)
    quantize_fp8(ref)  # fp8: built on the host, quantized there, then attached
    _same(build_swapped_model(cfg, seed=4, resident_blocks=spread_blocks(2, LAYERS), fp8=True)(v, a), ref(v, a))
    assert spread_blocks(2, LAYERS) == [0, 2] and spread_blocks(0, LAYERS) == [] and spread_blocks(5, 5) == [0, 1, 2, 3, 4]


def test_lora_on_streamed_blocks(tmp_path):
    """Resident + LoRA == streamed + LoRA (host and file); without it, the original weights."""
    cfg, files = _checkpoint(tmp_path, torch.float32)
    v, a = make_inputs(cfg)
    ref = build_model(cfg, dtype=torch.float32, files=files)
    spec = checkpoint_spec(ref)
    g = torch.Generator().manual_seed(7)
    pairs = {}
    for i in (0, 2, 4):  # merged q/k/v shards, column, row and audio<->video projections
        for name in ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "ff.net.2",
                     "audio_to_video_attn.to_k", "audio_ff.net.0.proj"):
            key = f"transformer_blocks.{i}.{name}.weight"
            out, inp = spec[key][3]
            pairs[key] = (torch.randn(3, inp, generator=g) * 0.1, torch.randn(out, 3, generator=g) * 0.1)
    lora = LoraWeights(pairs, strength=0.7)
    rv = ref(v, a)
    with lora_applied(ref, lora):
        lv = ref(v, a)
    assert not torch.equal(lv[0], rv[0])
    for source in ("host", "file"):
        model = build_model(cfg, dtype=torch.float32, files=files)
        enable_block_swap(model, {0, 3}, source=source, files=files)
        before = official_state_dict(model) if source == "host" else None
        with lora_applied(model, lora):
            _same(model(v, a), lv)
            _same(model(v, a), lv)
        _same(model(v, a), rv)
        if before is not None:
            after = official_state_dict(model)
            assert all(torch.equal(after[k], before[k]) for k in before)


def test_fp8_blocks_stream(tmp_path):
    cfg = _cfg()
    v, a = make_inputs(cfg, dtype=torch.bfloat16)
    ref = build_model(cfg, seed=6)
    quantize_fp8(ref)
    rv = ref(v, a)
    model = build_model(cfg, seed=6)
    quantize_fp8(model)
    swap = enable_block_swap(model, 1)
    _same(model(v, a), rv)
    assert swap.block_nbytes == block_nbytes(ref.transformer_blocks[1])
    meta = build_model_meta(cfg)
    assert device_nbytes(meta, 1) > swap.device_nbytes  # bf16 blocks
    quantize_fp8(meta)
    assert device_nbytes(meta, 1) == swap.device_nbytes  # the planner's figure, before anything is allocated

    late = build_model(cfg, seed=6)
    enable_block_swap(late, 1)
    quantize_fp8(late)
    with pytest.raises(RuntimeError, match="quantize first, then enable block swap"):
        late(v, a)
    cfg2, files = _checkpoint(tmp_path, torch.bfloat16)
    q = build_model(cfg2, files=files)
    quantize_fp8(q)
    qv = q(v, a)
    with pytest.raises(ValueError, match="source='file' streams checkpoint tensors only"):
        enable_block_swap(q, 0, source="file", files=files)
    _same(q(v, a), qv)  # the refusal left the model as it was


def build_model_meta(cfg):
    from ltx2_tp.models.ltx2.model import LTX2Model

    with torch.device("meta"):
        return LTX2Model(cfg).to(torch.bfloat16)


def test_compiled_blocks_do_not_recompile():
    """Re-pointing a parameter at another buffer of the same shape, stride and dtype is not a guard
    failure: one graph for every block, streamed or resident, over several forwards."""
    torch._dynamo.reset()
    cfg = _cfg()
    model = build_model(cfg, dtype=torch.float32, seed=2)
    v, a = make_inputs(cfg)
    rv = model(v, a)
    enable_block_swap(model, {1})
    counter = CompileCounterWithBackend("eager")
    compile_blocks(model, backend=counter)
    for _ in range(2):
        _same(model(v, a), rv)
    assert counter.frame_count == 1, counter.frame_count
    torch._dynamo.reset()


def test_bad_arguments(tmp_path):
    cfg = _cfg()
    model = build_model(cfg, dtype=torch.float32, seed=1)
    with pytest.raises(ValueError, match=r"resident_blocks must be in \[0, 5\]"):
        enable_block_swap(model, 6)
    with pytest.raises(ValueError, match=r"resident_blocks indices must be in \[0, 4\], got \[5\]"):
        enable_block_swap(model, {0, 5})
    with pytest.raises(ValueError, match="source must be one of"):
        enable_block_swap(model, 0, source="disk")
    with pytest.raises(ValueError, match="source='file' needs files"):
        enable_block_swap(model, 0, source="file")
    with pytest.raises(ValueError, match="slots must be >= 1"):
        enable_block_swap(model, 0, slots=0)
    enable_block_swap(model, 2)
    with pytest.raises(ValueError, match="already enabled"):
        enable_block_swap(model, 2)


def _tp_worker(rank, world, cfg, sd, files, inputs):
    from ltx2_tp.distributed.context import build_groups

    ctx = build_groups(world, 1, 1)
    ref = build_model(cfg, ctx, dtype=torch.float32, state_dict=sd)
    rv = ref(*inputs)
    out = {}
    for source, resident in (("host", 1), ("file", 0)):
        model = build_model(cfg, ctx, dtype=torch.float32, state_dict=sd)
        swap = enable_block_swap(model, resident, source=source, files=files)
        ov = model(*inputs)
        out[source] = (all(torch.equal(o, r) for o, r in zip(ov, rv)), swap.block_nbytes)
    return out


def test_tp2_ranks_stream_their_shards(tmp_path):
    from dist_utils import run_distributed

    cfg, files = _checkpoint(tmp_path, torch.float32)
    single = build_model(cfg, dtype=torch.float32, files=files)
    inputs = make_inputs(cfg, batch=1)
    results = run_distributed(_tp_worker, 2, cfg, official_state_dict(single), files, inputs)
    whole = block_nbytes(single.transformer_blocks[0])
    for r in results:
        for source, (equal, nbytes) in r.items():
            assert equal, source
            assert nbytes < 0.6 * whole, (nbytes, whole)  # a rank's shards: about half a block
