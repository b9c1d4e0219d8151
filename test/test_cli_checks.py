"""`ltx2-tp generate` / `serve` refuse bad flags with a message naming the flag, before any model is
built (the component builder is replaced by one that fails the test), and `--help` shows defaults."""

from __future__ import annotations

import pytest
import torch

import ltx2_tp.cli as cli


@pytest.fixture(autouse=True)
def nothing_built(monkeypatch):
    def built(*a, **k):
        raise AssertionError("a model was built before the flags were checked")

    monkeypatch.setattr(cli, "_components", built)


def _fails(capsys, *argv) -> str:
    assert cli.main(list(argv)) == 2
    return capsys.readouterr().err


def test_image_path_must_be_an_image(tmp_path, capsys):
    txt = tmp_path / "notes.png"
    txt.write_text("not an image")
    assert "--image-path: not an image" in _fails(capsys, "generate", "--prompt", "x", "--image-path", str(txt))
    assert "--image-path: no such file" in _fails(capsys, "generate", "--prompt", "x", "--image-path",
                                                  str(tmp_path / "none.png"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
@pytest.mark.parametrize("command", [["generate", "--prompt", "x"], ["serve"]])
def test_device_cuda_without_cuda(capsys, command):
    assert "--device cuda: no CUDA device is available" in _fails(capsys, *command, "--device", "cuda")


def test_device_must_parse_and_serve_limits_are_checked(capsys):
    assert "--device: expected cpu, cuda or cuda:N" in _fails(capsys, "generate", "--prompt", "x", "--device", "tpu")
    assert "--max-queue must be at least 1" in _fails(capsys, "serve", "--max-queue", "0")
    assert "--collective-timeout-s must be at least 1" in _fails(capsys, "serve", "--collective-timeout-s", "0")


@pytest.mark.parametrize("command,shown", [
    ("serve", ["(default: 8000)", "(default: 8)", "(default: outputs/server)", "(default: 10000)"]),
    ("generate", ["(default: 384)", "(default: 49)", "(default: outputs/ltx2_tp.mp4)"]),
])
def test_help_shows_defaults(capsys, command, shown):
    with pytest.raises(SystemExit) as e:
        cli.main([command, "--help"])
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for s in shown:
        assert s in text, s


def test_guidance_parallel_flags(capsys):
    gen = ["generate", "--prompt", "x"]
    assert "--guidance-parallel-size must be between 1 and 4" in _fails(capsys, *gen, "--guidance-parallel-size", "5")
    assert "--guidance-parallel-size (2) must divide --num-gpus (3)" in _fails(
        capsys, *gen, "--num-gpus", "3", "--guidance-parallel-size", "2")
    assert "must equal --guidance-parallel-size x --tp-size x --sp-size (2 x 1 x 1)" in _fails(
        capsys, *gen, "--num-gpus", "4", "--guidance-parallel-size", "2")
    assert "--enable-cfg-parallel means --guidance-parallel-size 2" in _fails(
        capsys, "serve", "--enable-cfg-parallel", "--guidance-parallel-size", "4", "--num-gpus", "4")
    # more groups than the request's passes: plain CFG on both streams, no STG / modality guidance = 2 passes
    cfg_only = ["--video-stg-guidance-scale", "0", "--audio-stg-guidance-scale", "0", "--a2v-guidance-scale", "1",
                "--v2a-guidance-scale", "1", "--pipeline-class-name", "LTX2TwoStagePipeline", "--width", "128",
                "--height", "128", "--num-frames", "9"]
    assert "this request runs 2 guidance pass(es) a step" in _fails(
        capsys, *gen, *cfg_only, "--num-gpus", "4", "--guidance-parallel-size", "4")
    assert "LTX2DistilledPipeline runs no guidance" in _fails(
        capsys, *gen, "--pipeline-class-name", "LTX2DistilledPipeline", "--num-gpus", "2", "--enable-cfg-parallel")


def test_serve_warmup_shapes_are_checked(capsys):
    assert "--warmup: '128x128' is not WIDTHxHEIGHTxFRAMES" in _fails(capsys, "serve", "--warmup", "128x128")
    assert "--warmup: 100x128x9: width: must be a multiple of 64" in _fails(capsys, "serve", "--warmup",
                                                                         "128x128x9,100x128x9")
