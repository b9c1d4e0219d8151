"""sglang integration on a CPU: registration (both ways in), resolution through sglang's own
registry and argument parser, and a real `sglang generate --pipeline-class-name LTX2LongVideo`
whose video equals `ltx2-tp generate`'s. sglang 0.5.23 runs from a side environment
(test/sglang_cpu_env.py) in subprocesses; the main environment never imports it."""

from __future__ import annotations

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
