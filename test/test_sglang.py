"""sglang integration on a CPU: registration (both ways in), resolution through sglang's own
registry and argument parser, and a real `sglang generate --pipeline-class-name LTX2LongVideo`
whose video equals `ltx2-tp generate`'s. sglang 0.5.23 runs from a side environment
(test/sglang_cpu_env.py) in subprocesses; the main environment never imports it."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import av
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
import sglang_cpu_env  # noqa: E402

EXTERNAL = "ltx2_tp.integrations.sglang"


@pytest.fixture(scope="module")
def env():
    return sglang_cpu_env.ensure()


def run_py(code: str, env: dict, **extra) -> str:
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env={**env, **extra}, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    return r.stdout


def frames(path):
    with av.open(str(path)) as f:
        v = f.streams.video[0]
        arr = np.stack([fr.to_ndarray(format="rgb24") for fr in f.decode(video=0)])
    with av.open(str(path)) as f:
        audio = [s.codec_context.name for s in f.streams.audio]
    return arr, (v.width, v.height), audio


RESOLVE = """
    import json, os
    from sglang.multimodal_gen.runtime.platforms.plugins import load_plugins
    if os.environ.get("VIA_PLUGIN"):
        load_plugins()  # what sglang's workers do at start-up
    from sglang.multimodal_gen.registry import get_pipeline_class, get_model_info, get_pipeline_config_classes
    from sglang.multimodal_gen.runtime.models.registry import ModelRegistry
    from sglang.cli.utils import get_is_diffusion_model
    cls = get_pipeline_class("LTX2LongVideo")
    model_cls, arch = ModelRegistry.resolve_model_cls("LTX2TPModel")
    info = get_model_info("ltx2-tp/tiny", backend="sglang")
    two = get_pipeline_class("LTX2TwoStagePipeline")
    family = {n: get_pipeline_class(n).__module__ for n in (
        "LTX2Pipeline", "LTX2TwoStageHQPipeline", "LTX2DistilledPipeline", "LTX2KeyframeInterpolationPipeline",
        "LTX2RetakePipeline", "LTX2ICLoraPipeline", "LTX2A2VidPipeline")}
    print(json.dumps({"pipeline": f"{cls.__module__}.{cls.__name__}", "model": f"{model_cls.__module__}.{model_cls.__name__}",
                      "info": info.pipeline_cls.__name__, "params": get_pipeline_config_classes("LTX2LongVideo")[1].__name__,
                      "diffusion": get_is_diffusion_model("ltx2-tp/tiny"), "two_stage": two.__module__, "family": family}))
"""


@pytest.mark.parametrize("way", ["external_package", "plugin_entry_point"])
def test_registration_resolves_through_sglang(env, way):
    import json

    extra = {"SGLANG_EXTERNAL_MODEL_PACKAGE": EXTERNAL} if way == "external_package" else {"VIA_PLUGIN": "1"}
    out = json.loads(run_py(RESOLVE, env, **extra).strip().splitlines()[-1])
    assert out["pipeline"] == f"{EXTERNAL}.SGLangLTX2LongVideo"
    assert out["model"] == "ltx2_tp.models.ltx2.model.LTX2Model"
    assert out["info"] == "SGLangLTX2LongVideo" and out["params"] == "LTX2TPSamplingParams"
    assert out["diffusion"] is True
    assert out["two_stage"].startswith("sglang.")  # sglang's own LTX2TwoStagePipeline stays unless asked
    for name, module in out["family"].items():  # ours where sglang has none, sglang's own where it has one
        assert module == EXTERNAL if name not in ("LTX2Pipeline", "LTX2TwoStageHQPipeline") else module.startswith("sglang."), (name, module)


def test_two_stage_override_when_asked(env):
    import json

    out = json.loads(run_py(RESOLVE, env, SGLANG_EXTERNAL_MODEL_PACKAGE=EXTERNAL,
                            LTX2_TP_SGLANG_TWO_STAGE="1").strip().splitlines()[-1])
    assert out["two_stage"] == EXTERNAL
    assert set(out["family"].values()) == {EXTERNAL}  # sglang's LTX2Pipeline and HQ replaced too


def test_sglang_argument_parser_takes_our_pipeline(env):
    out = run_py("""
        import argparse, sys
        from sglang.multimodal_gen.runtime.entrypoints.cli.generate import (
            add_multimodal_gen_generate_args, _resolve_cli_sampling_params_cls)
        from sglang.multimodal_gen.runtime.server_args import ServerArgs
        p = argparse.ArgumentParser()
        add_multimodal_gen_generate_args(p)
        argv = ["--model-path", "ltx2-tp/tiny", "--pipeline-class-name", "LTX2LongVideo", "--prompt", "x"]
        sys.argv = ["sglang", "generate", *argv]  # sglang reads which flags were given from sys.argv
        args, unknown = p.parse_known_args(argv)
        sa = ServerArgs.from_cli_args(args, unknown)
        cls = _resolve_cli_sampling_params_cls(sa)
        print(sa.pipeline_class_name, cls.__name__, cls().num_frames, cls().width, cls().height)
    """, env, SGLANG_EXTERNAL_MODEL_PACKAGE=EXTERNAL)
    assert out.split()[-5:] == ["LTX2LongVideo", "LTX2TPSamplingParams", "121", "768", "512"]


def test_sglang_generate_runs_our_pipeline(env, tmp_path):
    args = ["--prompt", "a red fox", "--num-frames", "17", "--width", "256", "--height", "192",
            "--num-inference-steps", "2", "--seed", "0", "--guidance-scale", "3"]
    sg_out = tmp_path / "sglang"
    r = subprocess.run([sys.executable, "-c", "import sys; from sglang.cli.main import main; sys.exit(main())",
                        "generate", "--model-path", "ltx2-tp/tiny", "--pipeline-class-name", "LTX2LongVideo",
                        "--output-path", str(sg_out), *args],
                       env={**env, "SGLANG_EXTERNAL_MODEL_PACKAGE": EXTERNAL}, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    videos = sorted(sg_out.glob("*.mp4"))
    assert len(videos) == 1 and not list(sg_out.glob(".*"))  # one finished file, no temporaries left
    sg_frames, size, audio = frames(videos[0])
    assert sg_frames.shape[0] == 17 and size == (256, 192) and audio == ["aac"]
    own = tmp_path / "own.mp4"
    r = subprocess.run([sys.executable, "-m", "ltx2_tp.cli", "generate", "--model", "tiny", "--output-path", str(own),
                        *args], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert np.array_equal(frames(own)[0], sg_frames)  # sglang ran exactly our pipeline


def test_register_without_sglang_says_so():
    from ltx2_tp.integrations import sglang as integ

    if integ.HAVE_SGLANG:
        pytest.skip("sglang is installed in the main environment")
    with pytest.raises(ImportError, match="sglang is not installed"):
        integ.register()


# ---- retake, A2Vid, IC-LoRA through sglang's own fields --------------------------------------------
def test_request_from_sglang_carries_the_pipelines_inputs():
    """sglang's video_path (the retake source; its video API fills it from the video_reference
    upload), the model-owned fields (retake region, A2Vid audio, IC-LoRA references) and sglang's
    --lora-path / --lora-scale (the IC-LoRA) reach our request and pipeline (main environment:
    sglang's Req stands in as a namespace with its fields)."""
    from types import SimpleNamespace

    from ltx2_tp.integrations.sglang import INPUT_FIELDS, SGLANG_EXTRA_FIELDS, pipeline_options, request_from_sglang
    from ltx2_tp.pipelines.registry import get_pipeline_class

    assert set(INPUT_FIELDS) <= set(SGLANG_EXTRA_FIELDS)
    base = dict(prompt=["a fox"], negative_prompt=[""], width=128, height=128, num_frames=9, fps=24,
                num_inference_steps=2, guidance_scale=3.0, seed=[0])
    req = request_from_sglang(SimpleNamespace(**base, video_path=["src.mp4"], start_time=0.1, end_time=0.3))
    assert (req.video_path, req.start_time, req.end_time) == ("src.mp4", 0.1, 0.3)
    req = request_from_sglang(SimpleNamespace(**base, audio_path="speech.wav", audio_start_time=1.5,
                                              audio_max_duration=2.0))
    assert (req.audio_path, req.audio_start_time, req.audio_max_duration) == ("speech.wav", 1.5, 2.0)
    req = request_from_sglang(SimpleNamespace(**base, video_conditioning=[["depth.mp4", 0.5], "pose.mp4"],
                                              conditioning_attention_strength=0.5))
    assert req.video_conditioning == [("depth.mp4", 0.5), ("pose.mp4", 1.0)] and req.conditioning_attention_strength == 0.5
    args = SimpleNamespace(lora_path="ic.safetensors", lora_scale=0.8)
    assert pipeline_options(get_pipeline_class("LTX2ICLoraPipeline"), args) == {"lora_path": "ic.safetensors",
                                                                                 "lora_strength": 0.8}
    assert pipeline_options(get_pipeline_class("LTX2TwoStagePipeline"), args) == {}


SGLANG_INPUTS = """
    import json
    from sglang.multimodal_gen.registry import get_pipeline_config_classes
    from sglang.multimodal_gen.runtime.entrypoints.openai.utils import get_sampling_request_extra_fields
    params = get_pipeline_config_classes("LTX2RetakePipeline")[1]
    print(json.dumps(sorted(get_sampling_request_extra_fields(params, "video"))))
"""


def _sglang_generate(env, out, *args):
    r = subprocess.run([sys.executable, "-c", "import sys; from sglang.cli.main import main; sys.exit(main())",
                        "generate", "--model-path", "ltx2-tp/tiny", "--output-path", str(out), *args],
                       env={**env, "SGLANG_EXTERNAL_MODEL_PACKAGE": EXTERNAL}, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    videos = sorted(Path(out).glob("*.mp4"))
    assert len(videos) == 1
    return frames(videos[0])


def _own_generate(path, *args):
    r = subprocess.run([sys.executable, "-m", "ltx2_tp.cli", "generate", "--model", "tiny", "--output-path", str(path),
                        *args], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    return frames(path)


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("LTX2_TP_SLOW"), reason="three sglang processes (~3 min): LTX2_TP_SLOW=1 "
                    "python -m pytest -q test/test_sglang.py -k sglang_runs_retake")
def test_sglang_runs_retake_and_ic_lora_with_its_own_fields(env, tmp_path):
    """`sglang generate --pipeline-class-name LTX2RetakePipeline --video-path SRC` (the region from
    --config) and LTX2ICLoraPipeline with `--lora-path ... --lora-scale 0.8` (the references from
    --config) write the frames `ltx2-tp generate` writes; sglang's video API accepts the input fields.
    The source has no sound (its retake would encode audio: torchaudio, not installed here)."""
    import json

    import torch
    from safetensors.torch import save_file

    from ltx2_tp.models.ltx2.weights import official_state_dict
    from ltx2_tp.pipelines.tiny import build_tiny_components  # (makes ltx-pipelines importable without torchaudio)
    from ltx_pipelines.utils.media_io import encode_video

    fields = json.loads(run_py(SGLANG_INPUTS, env, SGLANG_EXTERNAL_MODEL_PACKAGE=EXTERNAL).strip().splitlines()[-1])
    assert {"start_time", "end_time", "audio_path", "audio_start_time", "video_conditioning"} <= set(fields)
    src = tmp_path / "src.mp4"
    rng = np.random.default_rng(0)
    encode_video(iter([torch.from_numpy((rng.random((9, 64, 64, 3)) * 255).astype(np.uint8))]), 24, None, str(src), 1)
    cfg = tmp_path / "retake.json"
    cfg.write_text(json.dumps({"start_time": 0.1, "end_time": 0.3}))
    common = ["--prompt", "a fox", "--seed", "0", "--num-inference-steps", "2"]
    sg, size, _ = _sglang_generate(env, tmp_path / "sg_retake", "--pipeline-class-name", "LTX2RetakePipeline",
                                   "--video-path", str(src), "--config", str(cfg), *common)
    own = _own_generate(tmp_path / "retake.mp4", "--pipeline-class-name", "LTX2RetakePipeline", "--video-path",
                        str(src), "--start-time", "0.1", "--end-time", "0.3", *common)[0]
    assert size == (64, 64) and np.array_equal(sg, own)

    lora = tmp_path / "ic.safetensors"
    g = torch.Generator().manual_seed(1)
    pairs = {}
    for k, v in official_state_dict(build_tiny_components(0).transformer).items():
        if v.ndim == 2 and k.startswith("transformer_blocks.") and k.endswith(".weight"):
            base = "diffusion_model." + k[: -len(".weight")]
            pairs[base + ".lora_A.weight"] = torch.randn(2, v.shape[1], generator=g) * 0.1
            pairs[base + ".lora_B.weight"] = torch.randn(v.shape[0], 2, generator=g) * 0.1
    save_file(pairs, str(lora))
    cfg = tmp_path / "ic.json"
    cfg.write_text(json.dumps({"video_conditioning": [[str(src), 1.0]], "conditioning_attention_strength": 0.5}))
    size_flags = ["--width", "128", "--height", "128", "--num-frames", "9", "--prompt", "a fox", "--seed", "0"]
    sg, _, _ = _sglang_generate(env, tmp_path / "sg_ic", "--pipeline-class-name", "LTX2ICLoraPipeline", "--lora-path",
                                str(lora), "--lora-scale", "0.8", "--config", str(cfg), *size_flags)
    own = _own_generate(tmp_path / "ic.mp4", "--pipeline-class-name", "LTX2ICLoraPipeline", "--lora", str(lora), "0.8",
                        "--video-conditioning", str(src), "1.0", "--conditioning-attention-strength", "0.5",
                        *size_flags)[0]
    assert np.array_equal(sg, own)
