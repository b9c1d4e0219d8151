"""--model-path: official-layout files (written here at tiny size) load into every component, the
distilled LoRA is fused for stage 2 exactly as ltx-core fuses it and removed after, and every
missing file is reported naming its flag."""

from __future__ import annotations

import subprocess
import sys

import av
import numpy as np
import pytest
import torch

from ltx2_tp.models.ltx2.lora import LoraWeights, lora_applied
from ltx2_tp.models.ltx2.weights import official_state_dict
from ltx2_tp.pipelines.checkpoints import CheckpointFiles, build_components
from ltx2_tp.pipelines.tiny import build_tiny_components, write_official_files
from ltx2_tp.pipelines.registry import get_pipeline_class
from ltx2_tp.pipelines.request import GenerationRequest, RequestError

PARTS = ["video_encoder", "video_decoder", "upsampler", "audio_decoder", "vocoder", "text_encoder", "transformer"]


@pytest.fixture(scope="module")
def tiny():
    return build_tiny_components(seed=0)


@pytest.fixture(scope="module")
def folder(tiny, tmp_path_factory):
    d = tmp_path_factory.mktemp("ltx2_official")
    write_official_files(tiny, d, lora_rank=2)
    return d


def frames(path):
    with av.open(str(path)) as f:
        return np.stack([fr.to_ndarray(format="rgb24") for fr in f.decode(video=0)])


def test_every_component_loads_bit_exact(tiny, folder):
    c = build_components(str(folder), text_encoder_path="tiny")
    for name in PARTS:
        a, b = getattr(tiny, name).state_dict(), getattr(c, name).state_dict()
        assert a.keys() == b.keys(), name
        assert all(torch.equal(a[k], b[k]) for k in a), name
    assert (c.video_latent_channels, c.audio_latent_channels, c.audio_mel_bins) == (16, 1, 16)
    linears = [k for k, v in official_state_dict(tiny.transformer).items()
               if k.startswith("transformer_blocks.") and k.endswith(".weight") and v.ndim == 2]
    assert c.stage2_lora is not None and sorted(c.stage2_lora.pairs) == sorted(linears)


def test_files_without_lora_give_the_same_video(tiny, folder, tmp_path):
    import shutil

    for name in ("ltx-2-tiny-dev.safetensors", "ltx-2-spatial-upscaler-x2-tiny.safetensors"):  # no LoRA beside
        shutil.copy(folder / name, tmp_path / name)
    c = build_components(str(tmp_path / "ltx-2-tiny-dev.safetensors"), text_encoder_path="tiny")
    assert c.stage2_lora is None
    req = lambda: GenerationRequest(prompt="a fox", width=128, height=128, num_frames=9, num_inference_steps=2, seed=4)  # noqa: E731
    a = frames(get_pipeline_class("LTX2TwoStagePipeline")(tiny)(req(), tmp_path / "a.mp4").path)
    b = frames(get_pipeline_class("LTX2TwoStagePipeline")(c)(req(), tmp_path / "b.mp4").path)
    assert np.array_equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lora_fused_as_ltx_core_and_removed_after(tiny, folder, dtype):
    from ltx_core.loader.fuse_loras import apply_loras
    from ltx_core.loader.primitives import LoraStateDictWithStrength, StateDict

    model = build_tiny_components(seed=0, dtype=dtype).transformer
    before = official_state_dict(model)
    lora = LoraWeights.from_file(str(folder / "ltx-2-tiny-distilled-lora-384.safetensors"), strength=0.8)
    lora_sd = {k[: -len(".weight")] + suffix: t for k, (a, b) in lora.pairs.items()
               for suffix, t in ((".lora_A.weight", a.to(dtype)), (".lora_B.weight", b.to(dtype)))}
    if dtype == torch.bfloat16:  # ltx-core fuses bf16 (and fp8) weights
        ref = apply_loras(StateDict(dict(before), torch.device("cpu"), 0, {dtype}),
                          [LoraStateDictWithStrength(StateDict(lora_sd, torch.device("cpu"), 0, {dtype}), 0.8)]).sd
    else:
        ref = {k: v + (lora_sd[k[:-7] + ".lora_B.weight"] * 0.8) @ lora_sd[k[:-7] + ".lora_A.weight"]
               if k[:-7] + ".lora_A.weight" in lora_sd else v for k, v in before.items()}
    lora.pairs = {k: (a.to(dtype), b.to(dtype)) for k, (a, b) in lora.pairs.items()}
    with lora_applied(model, lora):
        during = official_state_dict(model)
    after = official_state_dict(model)
    changed = [k for k in before if not torch.equal(before[k], during[k])]
    assert len(changed) == len(lora.pairs)
    for k in before:
        assert torch.equal(during[k], ref[k]), k
        assert torch.equal(after[k], before[k]), k


def test_lora_shards_under_tp_match_single_rank(folder):
    """Each TP rank adds its own shard of the delta (through the layer's weight loader)."""
    from ltx2_tp.distributed.context import ParallelContext
    from ltx2_tp.models.ltx2.config import get_config
    from ltx2_tp.models.ltx2.weights import build_model, checkpoint_spec

    lora = LoraWeights.from_file(str(folder / "ltx-2-tiny-distilled-lora-384.safetensors"))
    full = build_model(get_config("tiny"), dtype=torch.float32, seed=1)
    with lora_applied(full, lora):
        want = official_state_dict(full)
    for rank in range(2):
        ctx = ParallelContext()
        ctx.tp_size, ctx.tp_rank = 2, rank
        shard = build_model(get_config("tiny"), ctx, dtype=torch.float32, seed=1)
        with lora_applied(shard, lora):
            got = {k: p.detach().clone() for k, (p, *_rest) in checkpoint_spec(shard).items()}
        ref = build_model(get_config("tiny"), ctx, dtype=torch.float32, state_dict=want)
        for k, (p, *_rest) in checkpoint_spec(ref).items():
            assert torch.equal(got[k], p), (rank, k)


def test_missing_files_name_their_flag(folder, tmp_path):
    with pytest.raises(RequestError) as e:
        CheckpointFiles.discover(str(tmp_path / "nope"))
    assert e.value.field == "model_path"
    (tmp_path / "ltx-2-x.safetensors").write_bytes((folder / "ltx-2-tiny-dev.safetensors").read_bytes())
    with pytest.raises(RequestError) as e:
        CheckpointFiles.discover(str(tmp_path), text_encoder="tiny")
    assert e.value.field == "spatial_upsampler_path"
    with pytest.raises(RequestError) as e:
        CheckpointFiles.discover(str(tmp_path), spatial_upsampler=str(folder / "ltx-2-spatial-upscaler-x2-tiny.safetensors"))
    assert e.value.field == "text_encoder_path"
    with pytest.raises(RequestError) as e:
        CheckpointFiles.discover(str(folder), text_encoder="tiny", distilled_lora=str(tmp_path / "missing.safetensors"))
    assert e.value.field == "distilled_lora_path"


def test_cli_generates_from_model_path(folder, tmp_path):
    out = tmp_path / "v.mp4"
    base = [sys.executable, "-m", "ltx2_tp.cli", "generate", "--prompt", "a fox", "--num-frames", "9", "--width", "128",
            "--height", "128", "--num-inference-steps", "2", "--output-path", str(out)]
    r = subprocess.run(base + ["--model-path", str(folder), "--text-encoder-path", "tiny"], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert frames(out).shape == (9, 128, 128, 3)
    r = subprocess.run(base + ["--model-path", str(folder)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "--text-encoder-path" in r.stderr and not (tmp_path / "none.mp4").exists()
