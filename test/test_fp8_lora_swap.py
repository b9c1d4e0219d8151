"""fp8 storages with the distilled LoRA and with block swap; the planner's weight figures.

- fp8-cast fuses a LoRA as ltx-core does (its CPU path bit for bit; its CUDA path's stochastic
  rounding checked for its properties), and gives the original weights back after;
- the fp8 matmul storages refuse a LoRA, naming what to do;
- block swap streams every tensor a method holds (scales included): streamed == resident, bit for bit,
  with and without a LoRA, from host memory and (an fp8 checkpoint's own tensors) from the file.
"""

from __future__ import annotations

import pytest
import torch
from reference import build_ltx_core, make_inputs, tiny_config

import ltx2_tp.layers.quantization.fp8_cast as fp8_cast
from ltx2_tp.layers.quantization.fp8_cast import e4m3_ulp, fuse_into_fp8
from ltx2_tp.layers.quantization.fp8_per_tensor import FP8
from ltx2_tp.memory.swap import block_layout, block_nbytes
from ltx2_tp.memory.weights_estimate import STORAGES, block_weight_bytes, model_block_bytes
from ltx2_tp.models.ltx2.config import get_config
from ltx2_tp.models.ltx2.lora import LoraWeights, lora_applied
from ltx2_tp.models.ltx2.quantization import build_transformer, calibrate_input_amax
from ltx2_tp.models.ltx2.weights import build_model, checkpoint_spec, official_state_dict, save_checkpoint

LAYERS = 4


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _sd(cfg, dtype=torch.bfloat16):
    return {k: v.detach().to(dtype) for k, v in build_ltx_core(cfg).state_dict().items()}


def _lora(cfg, dtype=torch.bfloat16, keys=None, scale=0.05):
    """A rank-3 LoRA over fused q/k/v shards, column, row and audio<->video projections of every block."""
    spec = checkpoint_spec(build_model(cfg, seed=0))  # bf16 shapes
    g = torch.Generator().manual_seed(7)
    pairs = {}
    for i in range(LAYERS):
        for name in keys or ("attn1.to_q", "attn1.to_v", "attn1.to_out.0", "ff.net.2", "audio_to_video_attn.to_k",
                             "audio_ff.net.0.proj"):
            key = f"transformer_blocks.{i}.{name}.weight"
            out, inp = spec[key].shape
            pairs[key] = ((torch.randn(3, inp, generator=g) * scale).to(dtype),
                          (torch.randn(out, 3, generator=g) * scale).to(dtype))
    return LoraWeights(pairs, strength=0.8)


def _same(a, b):
    for x, y in zip(a, b):
        assert torch.equal(x, y), (x - y).abs().max()


# ---- LoRA into fp8-cast ----------------------------------------------------------------------------------
def test_fp8_cast_lora_equals_ltx_core_fusion():
    """Round to nearest (ltx-core's CPU path, apply_loras on the fp8 state dict), bit for bit; the
    original fp8 weights come back after."""
    from ltx_core.loader.fuse_loras import apply_loras
    from ltx_core.loader.primitives import LoraStateDictWithStrength, StateDict

    cfg = tiny_config(num_layers=LAYERS)
    model = build_transformer(cfg, state_dict=_sd(cfg), quantization="fp8-cast")
    lora = _lora(cfg)
    before = official_state_dict(model)
    lora_sd = {k[:-len(".weight")] + s: t for k, (a, b) in lora.pairs.items()
               for s, t in ((".lora_A.weight", a), (".lora_B.weight", b))}
    ref = apply_loras(StateDict(dict(before), torch.device("cpu"), 0, set()),
                      [LoraStateDictWithStrength(StateDict(lora_sd, torch.device("cpu"), 0, set()), 0.8)]).sd
    with lora_applied(model, lora):
        during = official_state_dict(model)
    after = official_state_dict(model)
    fp8 = [k for k in lora.pairs if before[k].dtype == FP8]
    assert len(fp8) == len(lora.pairs) and sum(not torch.equal(before[k], during[k]) for k in fp8) == len(fp8)
    for k in before:
        assert torch.equal(during[k], ref[k].to(during[k].dtype)), k
        assert torch.equal(after[k], before[k]), k


def test_stochastic_rounding_properties():
    """ltx-core's CUDA fusion, with torch's random numbers: each result is an e4m3 value within 1.5
    ulp (the kernel's, from fp16(w) + fp16(delta)) of the sum (not always a neighbour: the kernel rounds
    sum + noise to bf16 before e4m3, and a tie goes to even); the mean over draws is the sum (deltas
    below half an ulp survive, which rounding to nearest drops); a zero delta keeps the weight."""
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(4096, generator=g) * 0.05).clamp(-1, 1).to(FP8)
    delta = (torch.randn(4096, generator=g) * 1e-3).to(torch.bfloat16)
    x = w.to(torch.float16) + delta.to(torch.float16)
    grid = torch.arange(-128, 128, dtype=torch.int16).to(torch.int8).view(FP8).float()
    grid = grid[torch.isfinite(grid)].unique()
    lo = grid[(torch.searchsorted(grid, x.float(), right=True) - 1).clamp(0, len(grid) - 1)]
    hi = grid[torch.searchsorted(grid, x.float()).clamp(0, len(grid) - 1)]
    draws = torch.stack([fuse_into_fp8(w, delta, torch.rand(4096, generator=g)).float() for _ in range(400)])
    ulp = e4m3_ulp(x)
    assert ((draws - x.float()).abs() <= 1.5 * ulp).all()
    inner = (hi != lo) & (lo.abs() != lo.abs().log2().floor().exp2())  # not at the bottom of a binade
    assert ((hi - lo)[inner] == ulp[inner]).all()  # the kernel's ulp is e4m3's spacing
    err = ((draws.mean(0) - x.float()) / ulp.clamp_min(1e-30))[hi != lo]  # in ulps; 400 draws: noise ~0.02
    near = ((fuse_into_fp8(w, delta).float() - x.float()) / ulp.clamp_min(1e-30))[hi != lo]
    assert err.abs().mean() < 0.05 < 0.15 < near.abs().mean() and abs(err.mean()) < 0.005, (err.abs().mean(), near.abs().mean())
    nearest = fuse_into_fp8(w, delta).float()
    assert (nearest == w.float()).float().mean() > 0.5 > (draws.mean(0) == w.float()).float().mean()
    assert torch.equal(fuse_into_fp8(w, torch.zeros_like(delta), torch.rand(4096, generator=g)), w)


def test_lora_refused_by_fp8_matmul_storages():
    cfg = tiny_config(num_layers=LAYERS)
    for q, hint in (("fp8-scaled-mm", "--quantization fp8-cast"), ("fp8-rowwise", "fuse it before quantize_fp8")):
        model = build_transformer(cfg, seed=1, quantization=q)
        with pytest.raises(ValueError, match=f"stored by Fp8.*LinearMethod: .*{hint}"):
            with lora_applied(model, _lora(cfg, keys=("ff.net.2",))):
                pass


# ---- block swap ------------------------------------------------------------------------------------------
def _checkpoints(tmp_path, cfg):
    """A bf16 file, Lightricks' scaled fp8 file and ltx-core's cast file of one model."""
    from test_fp8_checkpoints import cast_state_dict, scaled_state_dict

    sd = _sd(cfg)
    v, a = make_inputs(cfg, dtype=torch.bfloat16)
    calib = build_model(cfg, state_dict=sd)
    amax = calibrate_input_amax(calib, lambda: calib(v, a))
    from test_fp8_checkpoints import _amax_for_ltx_core_names

    files = {}
    for name, d in (("bf16", sd), ("scaled", scaled_state_dict(sd, _amax_for_ltx_core_names(amax))),
                    ("cast", cast_state_dict(sd))):
        save_checkpoint(d, tmp_path / f"{name}.safetensors")
        files[name] = [str(tmp_path / f"{name}.safetensors")]
    return files, amax, (v, a)


CASES = {  # name -> (file, build_transformer kwargs)
    "fp8-cast on load": ("bf16", dict(quantization="fp8-cast")),
    "fp8-scaled-mm on load": ("bf16", dict(quantization="fp8-scaled-mm")),
    "fp8-scaled-mm on load, calibrated": ("bf16", dict(quantization="fp8-scaled-mm", input_amax=True)),
    "fp8-rowwise": ("bf16", dict(quantization="fp8-rowwise")),
    "scaled file": ("scaled", {}),
    "scaled file as fp8-cast": ("scaled", dict(quantization="fp8-cast")),
    "cast file": ("cast", {}),
}


def test_streamed_fp8_equals_resident(tmp_path):
    """Every storage: blocks streamed from host memory (and an fp8 file's own tensors from the file)
    give the resident model's output bit for bit; every tensor of a method streams, scales included;
    the planner's figure is the swapper's."""
    cfg = tiny_config(num_layers=LAYERS)
    files, amax, inputs = _checkpoints(tmp_path, cfg)
    for name, (file, kw) in CASES.items():
        kw = dict(kw, input_amax=amax if kw.get("input_amax") else None)
        ref = build_transformer(cfg, files=files[file], **kw)
        rv = ref(*inputs)
        sources = ("host", "file") if file != "bf16" else ("host",)
        for source in sources:
            model = build_transformer(cfg, files=files[file], resident_blocks={0, 2}, source=source, **kw)
            _same(model(*inputs), rv)
            _same(model(*inputs), rv)
            swap = model.residency
            assert swap.block_nbytes == block_nbytes(ref.transformer_blocks[1]), name
        names = {e.name for e in block_layout(ref.transformer_blocks[1])[0]}
        if name in ("scaled file", "fp8-scaled-mm on load, calibrated"):
            assert {"weight_scale", "input_scale"} <= names, name
        storage = kw.get("quantization") or {"scaled": "fp8-scaled-mm", "cast": "fp8-cast"}[file]
        if file == "bf16" and not kw.get("input_amax"):
            assert block_weight_bytes(cfg, storage, 1) == block_nbytes(ref.transformer_blocks[1]), name
    with pytest.raises(ValueError, match="converts a bf16 checkpoint in memory.*source='host'"):
        build_transformer(cfg, files=files["bf16"], quantization="fp8-cast", resident_blocks=1, source="file")


@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_lora_on_streamed_fp8_cast_blocks(tmp_path, monkeypatch, rounding):
    """fp8-cast + LoRA: streamed blocks (host and the fp8 file) get the resident fused bits; the
    original weights after. Stochastic: fixed seed, the same numbers at each stream-in."""
    monkeypatch.setattr(fp8_cast, "LORA_ROUNDING", rounding)
    cfg = tiny_config(num_layers=LAYERS)
    files, _, inputs = _checkpoints(tmp_path, cfg)
    for file, kw in (("bf16", dict(quantization="fp8-cast")), ("cast", {}), ("scaled", dict(quantization="fp8-cast"))):
        ref = build_transformer(cfg, files=files[file], **kw)
        lora = _lora(cfg)
        rv = ref(*inputs)
        with lora_applied(ref, lora):
            lv = ref(*inputs)
        assert not torch.equal(lv[0], rv[0])
        for source in ("host", "file") if file != "bf16" else ("host",):
            model = build_transformer(cfg, files=files[file], resident_blocks={0, 3}, source=source, **kw)
            with lora_applied(model, lora):
                _same(model(*inputs), lv)
                _same(model(*inputs), lv)
            _same(model(*inputs), rv)


def test_weight_bytes_per_block():
    """The planner's figures: meta-device blocks, before anything is allocated."""
    cfg = tiny_config(num_layers=LAYERS)
    for storage in STORAGES:
        q = None if storage == "bf16" else storage
        model = build_transformer(cfg, seed=0, quantization=q)
        assert model_block_bytes(cfg, storage) == [block_nbytes(b) for b in model.transformer_blocks], storage
    big = get_config("ltx-2-19b")
    mib = {s: block_weight_bytes(big, s) / 2**20 for s in STORAGES}
    assert round(mib["bf16"], 1) == 736.4 and all(368 < mib[s] < 369 for s in STORAGES if s != "bf16"), mib
    assert block_weight_bytes(big, "fp8-scaled-mm", 0) == block_weight_bytes(big, "bf16", 0)  # ltx-core's exclusions
    assert round(block_weight_bytes(big, "bf16", tp_size=2) / 2**20, 1) == 368.3
    with pytest.raises(ValueError, match="storage must be one of"):
        block_weight_bytes(big, "int8")
