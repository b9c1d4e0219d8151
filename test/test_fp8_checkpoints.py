"""ltx-core's fp8 checkpoint formats (models/ltx2/quantization.py, layers/quantization/fp8_*.py).

The fp8 files are written with ltx-core 1.0.0's own functions (quantize_weight_to_fp8_per_tensor and
its layer exclusions; TRANSFORMER_LINEAR_DOWNCAST_MAP), so their layout is ltx-core's. References:
- fp8-cast: ltx-core's LTXModel under its fp8_cast policy (downcast state dict + upcast forward), fp32;
- fp8-scaled-mm: ltx-core's LTXModel with its FP8Linear swapped in and loaded through its transpose
  op; FP8Linear.forward needs TensorRT-LLM ops, so it is replaced by the dequantized fp32 arithmetic
  (x quantized with input_scale, (x8 * sx) @ (w8 * sw)). Every one of its FP8Linear calls is
  replayed through our layer on the same input (layer_parity): equal to fp32 rounding, and within
  bf16 rounding through the fused q/k/v GEMM (row-wise scales: CUDA writes its output in bf16).
  Whole-model outputs differ more: a 1e-7 difference in a linear's input (op order elsewhere) moves
  some activations across an e4m3 rounding boundary, so they are compared at 5e-2.
"""

from __future__ import annotations

from functools import partial

import pytest
import torch
from reference import TOL, build_ltx_core, make_inputs, rel_err, run_ltx_core, tiny_config

from ltx2_tp.layers.quantization.fp8_per_tensor import FP8, FP8_SCALED_MM
from ltx2_tp.models.ltx2.inputs import SKIP_A2V, SKIP_VIDEO_SELF_ATTN, Perturbations
from ltx2_tp.models.ltx2.quantization import (build_transformer, calibrate_input_amax, describe, inspect_checkpoint,
                                              resolve)
from ltx2_tp.models.ltx2.weights import COMFY_PREFIX, build_model, official_state_dict, save_checkpoint

pytest.importorskip("ltx_core")
LAYERS = 3  # block 0 excluded from fp8-scaled-mm (ltx-core's list), blocks 1-2 quantized


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _cfg(**kw):
    return tiny_config(num_layers=LAYERS, **kw)


# ---- ltx-core's formats -----------------------------------------------------------------------------
def scaled_state_dict(sd: dict[str, torch.Tensor], input_amax: dict[str, torch.Tensor] | None = None):
    """ltx-core's fp8_scaled_mm file: e4m3 (out, in) weights + weight_scale (+ input_scale = amax / 448)
    for every block linear outside EXCLUDED_LAYER_SUBSTRINGS; the rest as given."""
    from ltx_core.quantization.fp8_scaled_mm import (EXCLUDED_LAYER_SUBSTRINGS, _should_skip_layer,
                                                     quantize_weight_to_fp8_per_tensor)

    out = dict(sd)
    for key, w in sd.items():
        layer = key[: -len(".weight")]
        if not (key.startswith("transformer_blocks.") and key.endswith(".weight") and w.ndim == 2) or \
                _should_skip_layer(layer, EXCLUDED_LAYER_SUBSTRINGS):
            continue
        q, s = quantize_weight_to_fp8_per_tensor(w)  # (in, out): ltx-core's module layout
        out[key], out[layer + ".weight_scale"] = q.t().contiguous(), s  # the file's: (out, in)
        if input_amax is not None:
            out[layer + ".input_scale"] = input_amax[layer].float() / 448.0
    return out


def cast_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """ltx-core's fp8_cast downcast of a state dict (weights and biases of its layer list)."""
    from ltx_core.quantization.fp8_cast import TRANSFORMER_LINEAR_DOWNCAST_MAP

    return {k: TRANSFORMER_LINEAR_DOWNCAST_MAP.apply_to_key_value(k, v)[0].new_value for k, v in sd.items()}


def ltx_core_cast(cfg, sd_fp32):
    """ltx-core under its fp8_cast policy (fp32 compute)."""
    from ltx_core.quantization.fp8_cast import _amend_forward_with_upcast

    ref = build_ltx_core(cfg)
    ref.load_state_dict(cast_state_dict(sd_fp32), assign=True)
    return _amend_forward_with_upcast(ref, False)


def ltx_core_scaled(cfg, scaled_sd):
    """ltx-core's FP8Linear model loaded from a scaled state dict, forward dequantized (see the docstring)."""
    from ltx_core.quantization.fp8_scaled_mm import (EXCLUDED_LAYER_SUBSTRINGS, FP8_TRANSPOSE_SD_OPS, FP8Linear,
                                                     _apply_fp8_prepare_to_model)

    def forward(self, x):
        sx = self.input_scale
        x8 = (x * sx.reciprocal()).clamp(-448, 448).to(FP8)
        return (x8.float() * sx) @ (self.weight.float() * self.weight_scale) + self.bias

    ref = _apply_fp8_prepare_to_model(build_ltx_core(cfg), EXCLUDED_LAYER_SUBSTRINGS)
    sd = {}
    for k, v in scaled_sd.items():
        for r in FP8_TRANSPOSE_SD_OPS.apply_to_key_value(k, v):
            sd[r.new_key] = r.new_value
    ref.load_state_dict(sd)
    for m in ref.modules():
        if isinstance(m, FP8Linear):
            m.forward = partial(forward, m)
    return ref


@torch.no_grad()
def layer_parity(ref, ours, run) -> int:
    """Replay every FP8Linear call of ltx-core's model during `run()` through our layer; returns how many."""
    from ltx_core.quantization.fp8_scaled_mm import FP8Linear

    calls = []
    hooks = [m.register_forward_hook(lambda mod, inp, out, _n=n: calls.append((_n, inp[0], out)))
             for n, m in ref.named_modules() if isinstance(m, FP8Linear)]
    run()
    for h in hooks:
        h.remove()
    for name, x, y in calls:
        parent, proj = name.rsplit(".", 1)
        self_attn = parent.rsplit(".", 1)[1] in ("attn1", "audio_attn1")
        fused = ("to_qkv" if self_attn else "to_kv" if proj != "to_q" else None) if proj in ("to_q", "to_k", "to_v") else None
        if fused is None:
            assert rel_err(ours.get_submodule(name)(x), y) <= 1e-6, name
            continue
        layer = ours.get_submodule(f"{parent}.{fused}")
        i = layer.shard_names.index(proj)
        assert rel_err(layer.forward_shard(x, i), y) <= 1e-6, name  # one shard: per-tensor, as ltx-core
        assert rel_err(layer(x)[i], y) <= 2 ** -8, name  # all shards: one row-wise GEMM, bf16 out
    return len(calls)


def _pair(cfg):
    ref = build_ltx_core(cfg)
    return {k: v.detach().clone() for k, v in ref.state_dict().items()}


def _save(tmp_path, sd, name="dit.safetensors", prefix=COMFY_PREFIX):
    path = tmp_path / name
    save_checkpoint(sd, path, prefix=prefix)
    return [str(path)]


def _amax_for_ltx_core_names(amax: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our calibration (fused layer names) under ltx-core's module names (to_q, to_k, to_v ...)."""
    out = {}
    for name, a in amax.items():
        parent, last = name.rsplit(".", 1)
        shards = {"to_qkv": ("to_q", "to_k", "to_v"), "to_kv": ("to_k", "to_v")}.get(last)
        for s in shards or (last if last != "0" else None,):
            out[f"{parent}.{s}" if s else name] = a
    return out


# ---- detection ----------------------------------------------------------------------------------------
def test_detection_and_flag_table(tmp_path):
    cfg = _cfg()
    sd = _pair(cfg)
    bf16 = _save(tmp_path, sd, "bf16.safetensors")
    scaled = _save(tmp_path, scaled_state_dict(sd), "scaled.safetensors")
    cast = _save(tmp_path, cast_state_dict(sd), "cast.safetensors")
    f_bf16, f_scaled, f_cast = (inspect_checkpoint(f) for f in (bf16, scaled, cast))
    assert f_bf16.kind is None and f_scaled.kind == "fp8-scaled-mm" and f_cast.kind == "fp8-cast"
    assert not f_scaled.static_input_scales and f_scaled.fp8_weights == 2 * 28  # blocks 1, 2: 28 checkpoint weights (20 of our layers) each
    for q in (None, "fp8-cast", "fp8-scaled-mm", "fp8-rowwise"):
        assert resolve(q, f_bf16) == q
    assert resolve(None, f_scaled) == resolve("fp8-scaled-mm", f_scaled) == "fp8-scaled-mm"
    assert resolve("fp8-cast", f_scaled) == "fp8-cast" and resolve(None, f_cast) == "fp8-cast"
    for q, fmt in (("fp8-rowwise", f_scaled), ("fp8-rowwise", f_cast), ("fp8-scaled-mm", f_cast)):
        with pytest.raises(ValueError, match=f"--quantization {q}: the checkpoint is already fp8"):
            resolve(q, fmt)
    with pytest.raises(ValueError, match="--quantization: unknown value 'int8'; allowed: fp8-cast, fp8-scaled-mm"):
        resolve("int8")
    bad = scaled_state_dict(sd)
    del bad["transformer_blocks.1.attn1.to_k.weight_scale"]
    with pytest.raises(ValueError, match="weight_scale and 1 do not"):
        inspect_checkpoint(state_dict=bad)
    m = build_transformer(cfg, dtype=torch.float32, files=scaled)
    assert describe(m) == "40 fp8-scaled-mm (dynamic input scales), 20 bf16 block linears"


# ---- fp8-cast -------------------------------------------------------------------------------------------
def test_fp8_cast_equals_ltx_core_policy(tmp_path):
    """Cast on load (bf16 file) and loaded as stored (ltx-core's downcast file): ltx-core's fp8_cast to
    fp32 parity; both ways the same tensors."""
    cfg = _cfg(apply_gated_attention=True)  # the gate logits stay in the model dtype, as in ltx-core
    sd = _pair(cfg)
    v, a = make_inputs(cfg)
    rv, ra = run_ltx_core(ltx_core_cast(cfg, sd), v, a)
    on_load = build_transformer(cfg, dtype=torch.float32, state_dict=sd, quantization="fp8-cast")
    stored = build_transformer(cfg, dtype=torch.float32, files=_save(tmp_path, cast_state_dict(sd)))
    assert describe(on_load) == describe(stored) == "60 fp8-cast, 18 bf16 block linears"
    for m in (on_load, stored):
        ov, oa = m(v, a)
        assert rel_err(ov, rv) <= TOL and rel_err(oa, ra) <= TOL, (rel_err(ov, rv), rel_err(oa, ra))
    s1, s2 = official_state_dict(on_load), official_state_dict(stored)
    assert all(torch.equal(s1[k], s2[k].to(s1[k].dtype)) for k in s1)
    assert s1["transformer_blocks.2.ff.net.0.proj.weight"].dtype == FP8


def test_scaled_checkpoint_as_fp8_cast(tmp_path):
    """Lightricks' scaled file run with bf16 compute: w8 * weight_scale, no activation quantization."""
    cfg = _cfg()
    sd = _pair(cfg)
    scaled = scaled_state_dict(sd)
    deq = {k: (v.float() * scaled[k[:-6] + "weight_scale"]) if v.dtype == FP8 else v for k, v in scaled.items()
           if not k.endswith("_scale")}
    ref = build_ltx_core(cfg)
    ref.load_state_dict(deq)
    v, a = make_inputs(cfg)
    rv, ra = run_ltx_core(ref, v, a)
    m = build_transformer(cfg, dtype=torch.float32, files=_save(tmp_path, scaled), quantization="fp8-cast")
    assert describe(m) == "40 fp8-cast (scaled), 20 bf16 block linears"
    ov, oa = m(v, a)
    assert rel_err(ov, rv) <= TOL and rel_err(oa, ra) <= TOL


# ---- fp8-scaled-mm ----------------------------------------------------------------------------------------
def _calibrated(cfg, sd, v, a):
    ours = build_model(cfg, dtype=v.latent.dtype, state_dict=sd)
    return calibrate_input_amax(ours, lambda: ours(v, a))


def test_scaled_mm_equals_dequantized_ltx_core(tmp_path):
    """An official-format file (static input scales) against ltx-core's FP8Linear model, dequantized."""
    cfg = _cfg()
    sd = _pair(cfg)
    v, a = make_inputs(cfg)
    amax = _calibrated(cfg, sd, v, a)
    scaled = scaled_state_dict(sd, _amax_for_ltx_core_names(amax))
    ref = ltx_core_scaled(cfg, scaled)
    rv, ra = run_ltx_core(ref, v, a)
    m = build_transformer(cfg, dtype=torch.float32, files=_save(tmp_path, scaled))
    assert describe(m) == "40 fp8-scaled-mm (static input scales), 20 bf16 block linears"
    assert layer_parity(ref, m, lambda: run_ltx_core(ref, v, a)) == 2 * 28
    ov, oa = m(v, a)
    assert rel_err(ov, rv) <= 5e-2 and rel_err(oa, ra) <= 5e-2, (rel_err(ov, rv), rel_err(oa, ra))
    with torch.no_grad():  # the fp8 error itself: nonzero, bounded
        bf = build_model(cfg, dtype=torch.float32, state_dict=sd)(v, a)
    assert 1e-3 < rel_err(ov, bf[0]) < 0.1


@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
def test_quantize_on_load_equals_prequantized_file(tmp_path, static):
    cfg = _cfg()
    sd = {k: v.to(torch.bfloat16) for k, v in _pair(cfg).items()}
    v, a = make_inputs(cfg, dtype=torch.bfloat16)
    amax = _calibrated(cfg, sd, v, a) if static else None
    file_sd = scaled_state_dict(sd, _amax_for_ltx_core_names(amax) if static else None)
    loaded = build_transformer(cfg, files=_save(tmp_path, file_sd))
    on_load = build_transformer(cfg, state_dict=sd, quantization="fp8-scaled-mm", input_amax=amax)
    assert describe(loaded) == describe(on_load)
    s1, s2 = official_state_dict(on_load), official_state_dict(loaded)
    assert s1.keys() == s2.keys() and all(torch.equal(s1[k], s2[k]) for k in s1)
    assert s1.keys() == file_sd.keys() and all(torch.equal(s1[k], file_sd[k]) for k in s1)  # ltx-core's bytes
    for o, r in zip(on_load(v, a), loaded(v, a)):
        assert torch.equal(o, r)


def test_fused_shards_keep_their_scales():
    """q/k/v with very different magnitudes: one row-wise GEMM with per-shard scales; the value
    projection alone (STG) is per-tensor with its own scale; both match the dequantized reference."""
    from ltx2_tp.layers.linear import MergedColumnParallelLinear
    from ltx2_tp.layers.quantization.fp8_per_tensor import FP8_SCALED_MM_DYNAMIC, quantize_input

    g = torch.Generator().manual_seed(0)
    layer = MergedColumnParallelLinear(64, [32, 32, 32], ("to_q", "to_k", "to_v"))
    with torch.no_grad():
        layer.weight.copy_(torch.randn(96, 64, generator=g) * torch.tensor([0.01, 1.0, 30.0]).repeat_interleave(32)[:, None])
        layer.bias.copy_(torch.randn(96, generator=g))
    x = torch.randn(5, 7, 64, generator=g)
    FP8_SCALED_MM_DYNAMIC.quantize(layer)
    assert layer.weight_scale.shape == (3,) and layer.weight_scale[2] / layer.weight_scale[0] > 1000
    xs = x.abs().amax() / 448
    w = layer.weight.float() * layer.weight_scale.repeat_interleave(32)[:, None]
    ref = ((quantize_input(x, xs).float() * xs) @ w.t()).to(torch.bfloat16).float() + layer.bias
    q, k, vv = layer(x)
    out = torch.cat([q, k, vv], -1)
    assert rel_err(out[..., :32], ref[..., :32]) < 1e-5 and rel_err(out, ref) < 1e-5
    v_only = layer.forward_shard(x, 2)  # per-tensor: output in x's dtype
    ref_v = (quantize_input(x, xs).float() * xs) @ w[64:].t() + layer.bias[64:]
    assert rel_err(v_only, ref_v) < 1e-6


# ---- STG with every method --------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["fp8-cast", "fp8-scaled-mm-static", "fp8-scaled-mm", "fp8-rowwise"])
def test_stg_skips_with_every_method(tmp_path, method):
    """Skipped self-attention for the whole batch (the value projection alone) and for part of it:
    equal to ltx-core's reference where there is one, else close to the bf16 model (same skips)."""
    from ltx_core.guidance.perturbations import (BatchedPerturbationConfig, Perturbation, PerturbationConfig,
                                                 PerturbationType)

    cfg = _cfg(apply_gated_attention=True)
    sd = _pair(cfg)
    v, a = make_inputs(cfg)
    lc = BatchedPerturbationConfig([
        PerturbationConfig([Perturbation(PerturbationType.SKIP_VIDEO_SELF_ATTN, [1, 2]),
                            Perturbation(PerturbationType.SKIP_A2V_CROSS_ATTN, None)]),
        PerturbationConfig([Perturbation(PerturbationType.SKIP_VIDEO_SELF_ATTN, [1])]),
    ])
    ours_p = Perturbations([[(SKIP_VIDEO_SELF_ATTN, [1, 2]), (SKIP_A2V, None)], [(SKIP_VIDEO_SELF_ATTN, [1])]])
    if method == "fp8-cast":
        ref, tol = ltx_core_cast(cfg, sd), TOL
        m = build_transformer(cfg, dtype=torch.float32, state_dict=sd, quantization="fp8-cast")
    elif method == "fp8-scaled-mm-static":
        scaled = scaled_state_dict(sd, _amax_for_ltx_core_names(_calibrated(cfg, sd, v, a)))
        ref, tol = ltx_core_scaled(cfg, scaled), 5e-2
        m = build_transformer(cfg, dtype=torch.float32, files=_save(tmp_path, scaled))
        assert layer_parity(ref, m, lambda: run_ltx_core(ref, v, a, lc)) > 2 * 28  # + to_v alone (STG)
    else:  # dynamic activation scales: no ltx-core counterpart
        ref, tol = build_ltx_core(cfg), 0.25  # vs no fp8 at all (random weights of std 0.2)
        m = build_transformer(cfg, dtype=torch.float32, state_dict=sd, quantization=method)
    rv, ra = run_ltx_core(ref, v, a, lc)
    ov, oa = m(v, a, ours_p)
    assert torch.isfinite(ov).all() and rel_err(ov, rv) <= tol and rel_err(oa, ra) <= tol, (rel_err(ov, rv), rel_err(oa, ra))
    assert rel_err(ov, m(v, a)[0]) > 0.05  # the skips matter


# ---- TP ---------------------------------------------------------------------------------------------------
def _fused_under_lora(model, lora):
    """The fp8-cast q/k/v weight of block 1 while `lora` is fused (stochastic rounding)."""
    import ltx2_tp.layers.quantization.fp8_cast as fp8_cast
    from ltx2_tp.models.ltx2.lora import lora_applied

    before, fp8_cast.LORA_ROUNDING = fp8_cast.LORA_ROUNDING, "stochastic"
    try:
        with lora_applied(model, lora):
            return model.transformer_blocks[1].attn1.to_qkv.weight.clone()
    finally:
        fp8_cast.LORA_ROUNDING = before


def _tp_worker(rank, world, cfg, files, bf16_sd, inputs, lora):
    from ltx2_tp.distributed.context import build_groups

    ctx = build_groups(world, 1, 1)
    out = {"lora": _fused_under_lora(build_transformer(cfg, ctx, state_dict=bf16_sd, quantization="fp8-cast"), lora)}
    for name, kw in (("file", dict(files=files)), ("on_load", dict(state_dict=bf16_sd, quantization="fp8-scaled-mm"))):
        m = build_transformer(cfg, ctx, dtype=torch.float32, **kw)
        qkv = m.transformer_blocks[1].attn1.to_qkv
        out[name] = dict(out=[t.clone() for t in m(*inputs)], scale=qkv.weight_scale.clone(), w=qkv.weight.clone(),
                         row_scale=m.transformer_blocks[2].ff.net[2].weight_scale.clone())
    return out


def test_tp2_per_tensor_equals_single_rank(tmp_path):
    """TP=2 (gloo): every rank keeps the single rank's scales (a per-tensor scale holds for any shard;
    quantized on load, the amax is taken over the whole tensor) and its rows of the fp8 weights. A
    LoRA fused into fp8-cast weights with stochastic rounding gives each rank the single rank's bits."""
    from dist_utils import run_distributed

    from ltx2_tp.models.ltx2.lora import LoraWeights

    cfg = _cfg()
    sd = _pair(cfg)
    v, a = make_inputs(cfg, batch=1)
    scaled = scaled_state_dict(sd, _amax_for_ltx_core_names(_calibrated(cfg, sd, v, a)))
    files = _save(tmp_path, scaled)
    single = {"file": build_transformer(cfg, dtype=torch.float32, files=files),
              "on_load": build_transformer(cfg, dtype=torch.float32, state_dict=sd, quantization="fp8-scaled-mm")}
    g = torch.Generator().manual_seed(5)
    lora = LoraWeights({f"transformer_blocks.1.attn1.{p}.weight": (torch.randn(2, 32, generator=g) * 0.1,
                                                                  torch.randn(32, 2, generator=g) * 0.1)
                        for p in ("to_q", "to_v")})
    results = run_distributed(_tp_worker, 2, cfg, files, sd, (v, a), lora)
    fused = _fused_under_lora(build_transformer(cfg, state_dict=sd, quantization="fp8-cast"), lora)
    for rank, r in enumerate(results):
        assert torch.equal(r["lora"], torch.cat([s.narrow(0, rank * 16, 16) for s in fused.split(32)]))
    for name, m in single.items():
        ref = m(v, a)
        qkv = m.transformer_blocks[1].attn1.to_qkv
        for rank, r in enumerate(results):
            got = r[name]
            assert torch.equal(got["scale"], qkv.weight_scale), name
            assert torch.equal(got["row_scale"], m.transformer_blocks[2].ff.net[2].weight_scale), name
            rows = torch.cat([s.narrow(0, rank * 16, 16) for s in qkv.weight.split(32)])
            assert torch.equal(got["w"], rows), name
            tol = 1e-5 if name == "file" else 0.05  # fp32 partial sums; dynamic: a row shard's own x scale
            assert all(rel_err(o, f) < tol for o, f in zip(got["out"], ref)), (name, [rel_err(o, f) for o, f in zip(got["out"], ref)])
