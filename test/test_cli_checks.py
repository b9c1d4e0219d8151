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
