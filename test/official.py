"""ltx-pipelines 1.0.0's own pipelines, run at tiny size on CPU in fp32 over official-layout files.

What has to change for that, all here and all test-side (the pipelines' code runs unmodified):
- the files: `write_official_files` (pipelines/checkpoints.py) writes the tiny model; ltx-core's
  transformer builder also wants the diffusers-style constants of real checkpoints' transformer
  config (LTX_CORE_TRANSFORMER_KEYS), and A2Vid / retake want the audio VAE's encoder
  (`audio_vae.encoder.*`). ltx-core fuses LoRAs only into bf16 (or fp8) weights, so the DiT is
  written in bf16; both sides compute in fp32 from those exact values.
- dtype: every pipeline hard-codes `dtype = torch.bfloat16` (and `torch.cuda.synchronize()`): the
  pipeline module's `torch` is swapped for a view of torch whose `bfloat16` is float32 and whose
  `cuda.synchronize` is a no-op; res2s' `model_dtype` (bf16 by default) becomes float32 likewise;
  with a LoRA, ltx-core leaves the weights the LoRA does not touch in the file's bf16, so the
  ledger's transformer is cast to fp32 (exact). `cleanup_memory` (gc + CUDA cache) is skipped.
- sizes: `PipelineComponents.video_latent_channels` is fixed at 128 and `AudioLatentShape` defaults
  to 8 channels; the tiny model has 16 and 1 (a subclass with the tiny defaults is put in place).
- Gemma cannot run here: `encode_prompts` returns the tiny text encoder's contexts (the same
  encoded prompt both sides get).
- the final latents are read where the pipeline hands them to the VAE decoders (`vae_decode_video`,
  `vae_decode_audio` wrapped).
- torchaudio cannot be installed with torch 2.13: ltx-core's audio encoder builds a
  `torchaudio.transforms.MelSpectrogram`; `mel_spectrogram_stand_in` is a torch-only one (STFT
  magnitude, slaney mel filters), put in place for both sides, so the comparison of the A2Vid /
  retake pipelines runs ltx-core's real audio encoder on both.
"""

from __future__ import annotations

import contextlib
import json
import math
import types
from pathlib import Path

import torch

from ltx2_tp.compat import ensure_ltx_imports

ensure_ltx_imports()

LTX_CORE_TRANSFORMER_KEYS = dict(  # what ltx-core's LTXModelConfigurator checks in a real checkpoint's config
    dropout=0.0, attention_bias=True, num_vector_embeds=None, activation_fn="gelu-approximate", num_embeds_ada_norm=1000,
    use_linear_projection=False, only_cross_attention=False, cross_attention_norm=True, double_self_attention=False,
    upcast_attention=False, standardization_norm="rms_norm", norm_elementwise_affine=False, qk_norm="rms_norm",
    positional_embedding_type="rope", use_audio_video_cross_attention=True, share_ff=False, av_cross_ada_norm=True)


def write_files(folder: Path, lora_rank: int = 2, seed: int = 0):
    """Tiny official-layout files (bf16 DiT, LoRA, audio encoder) -> CheckpointFiles."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from ltx2_tp.pipelines.checkpoints import CheckpointFiles
    from ltx2_tp.pipelines.tiny import write_official_files
    from ltx2_tp.pipelines.tiny import TINY_AUDIO_VAE, build_tiny_components

    c = build_tiny_components(seed=seed, dtype=torch.bfloat16)
    write_official_files(c, folder, lora_rank=lora_rank, seed=seed)
    files = CheckpointFiles.discover(str(folder), text_encoder="tiny")
    with safe_open(files.checkpoint, framework="pt") as h:
        config = json.loads(h.metadata()["config"])
    config["transformer"].update(LTX_CORE_TRANSFORMER_KEYS)
    sd = load_file(files.checkpoint)
    with mel_spectrogram_stand_in():
        from ltx_core.model.audio_vae import AudioEncoderConfigurator

        torch.manual_seed(seed + 1)
        enc = AudioEncoderConfigurator.from_config(TINY_AUDIO_VAE)
    for k, v in enc.state_dict().items():
        if not k.startswith("per_channel_statistics."):  # shared with the decoder, already written
            sd["audio_vae.encoder." + k] = v.float()
    save_file(sd, files.checkpoint, metadata={"config": json.dumps(config), "model_version": "2.0.0-tiny"})
    return files


class _Fp32Torch(types.ModuleType):
    """torch, seen by an ltx-pipelines module: bfloat16 is float32 and there is no CUDA to sync."""

    bfloat16 = torch.float32
    cuda = types.SimpleNamespace(synchronize=lambda *a, **k: None, empty_cache=lambda: None,
                                 is_available=lambda: False)

    def __getattr__(self, name):
        return getattr(torch, name)


class Recorder:
    """The latents each pipeline hands to the decoders."""

    def __init__(self):
        self.video = self.audio = None


@contextlib.contextmanager
def official_fp32(module, contexts: dict, recorder: Recorder, audio_channels: int = 1, mel_bins: int = 16):
    """Run ltx-pipelines' `module` (e.g. ltx_pipelines.ti2vid_two_stages) at tiny size in fp32."""
    import ltx_pipelines.utils.helpers as helpers
    import ltx_pipelines.utils.samplers as samplers
    from ltx_core.types import AudioLatentShape
    from ltx_pipelines.utils.model_ledger import ModelLedger
    from ltx_pipelines.utils.types import PipelineComponents

    class TinyAudioShape(AudioLatentShape):
        @staticmethod
        def from_video_pixel_shape(shape, channels=audio_channels, mel_bins=mel_bins, *a, **k):
            return AudioLatentShape.from_video_pixel_shape(shape, channels, mel_bins, *a, **k)

    def encode_prompts(prompts, ledger, **kw):
        return [types.SimpleNamespace(video_encoding=contexts[p][0], audio_encoding=contexts[p][1]) for p in prompts]

    decode_video, decode_audio = module.vae_decode_video, getattr(module, "vae_decode_audio", None)

    def rec_video(latent, *a, **k):
        recorder.video = latent.detach().clone()
        return decode_video(latent, *a, **k)

    def rec_audio(latent, *a, **k):
        recorder.audio = latent.detach().clone()
        return decode_audio(latent, *a, **k)

    init = PipelineComponents.__init__

    def tiny_components(self, *a, **k):
        init(self, *a, **k)
        self.video_latent_channels = 16

    res2s = samplers.res2s_audio_video_denoising_loop
    transformer = ModelLedger.transformer

    def transformer_fp32(self):  # with a LoRA, ltx-core leaves the weights it does not touch in the file's bf16
        return transformer(self).to(torch.float32)  # (bf16 -> fp32 is exact)

    def res2s_fp32(*a, **k):
        return res2s(*a, **{"model_dtype": torch.float32, **k})

    saved = {}

    def put(obj, name, value):
        saved[(obj, name)] = getattr(obj, name)
        setattr(obj, name, value)

    fp32 = _Fp32Torch("torch")
    try:
        put(module, "torch", fp32)
        put(helpers, "torch", fp32)
        put(helpers, "AudioLatentShape", TinyAudioShape)
        put(module, "encode_prompts", encode_prompts)
        put(module, "vae_decode_video", rec_video)
        if decode_audio is not None:
            put(module, "vae_decode_audio", rec_audio)
        if hasattr(module, "res2s_audio_video_denoising_loop"):
            put(module, "res2s_audio_video_denoising_loop", res2s_fp32)
        put(PipelineComponents, "__init__", tiny_components)
        for m in (module, helpers):  # gc.collect + CUDA cache: memory only, and 0.4 s a call here
            put(m, "cleanup_memory", lambda: None)
        put(ModelLedger, "transformer", transformer_fp32)
        with mel_spectrogram_stand_in():
            yield
    finally:
        for (obj, name), value in saved.items():
            setattr(obj, name, value)


def drain(decoded):
    """Run the decoders' iterators (the recorder sees the latents before; this checks they decode)."""
    video, audio = decoded
    with torch.no_grad():  # the HQ pipeline's latents are inference tensors; its decoders' weights require grad
        frames = torch.cat([f.float() for f in video], dim=0)
    return frames, audio


# ---- torchaudio stand-in -------------------------------------------------------------------------

class MelSpectrogram(torch.nn.Module):
    """torchaudio.transforms.MelSpectrogram's arithmetic for the arguments ltx-core passes (power 1,
    slaney mel scale and norm, centred reflect-padded STFT): |STFT| @ triangular mel filters."""

    def __init__(self, sample_rate, n_fft, win_length, hop_length, f_min, f_max, n_mels, window_fn, center, pad_mode,
                 power, mel_scale, norm):
        super().__init__()
        assert power == 1.0 and mel_scale == "slaney" and norm == "slaney"
        self.n_fft, self.hop, self.win, self.center, self.pad_mode = n_fft, hop_length, win_length, center, pad_mode
        self.register_buffer("window", window_fn(win_length))
        self.register_buffer("fb", _slaney_filters(n_fft // 2 + 1, f_min, f_max, n_mels, sample_rate))

    def forward(self, x):
        shape = x.shape
        spec = torch.stft(x.reshape(-1, shape[-1]), self.n_fft, self.hop, self.win, self.window.to(x), self.center,
                          self.pad_mode, normalized=False, onesided=True, return_complex=True).abs()
        mel = torch.matmul(spec.transpose(-1, -2), self.fb.to(spec)).transpose(-1, -2)
        return mel.reshape(*shape[:-1], *mel.shape[-2:])


def _slaney_filters(n_freqs, f_min, f_max, n_mels, sample_rate):
    def hz_to_mel(f):
        return f / (200.0 / 3) if f < 1000 else 15.0 + math.log(f / 1000.0) / (math.log(6.4) / 27.0)

    def mel_to_hz(m):
        lin = m * (200.0 / 3)
        return torch.where(m >= 15.0, 1000.0 * torch.exp((math.log(6.4) / 27.0) * (m - 15.0)), lin)

    freqs = torch.linspace(0, sample_rate // 2, n_freqs)
    f_pts = mel_to_hz(torch.linspace(hz_to_mel(f_min), hz_to_mel(f_max), n_mels + 2))
    diff = f_pts[1:] - f_pts[:-1]
    slopes = f_pts[None, :] - freqs[:, None]
    fb = torch.clamp(torch.minimum(-slopes[:, :-2] / diff[:-1], slopes[:, 2:] / diff[1:]), min=0)
    return fb * (2.0 / (f_pts[2: n_mels + 2] - f_pts[:n_mels]))[None, :]


@contextlib.contextmanager
def mel_spectrogram_stand_in():
    import sys

    ta = sys.modules.get("torchaudio")
    if ta is None or not getattr(ta, "ltx2_tp_placeholder", False):  # the real torchaudio is installed
        yield
        return
    before = ta.transforms
    ta.transforms = types.SimpleNamespace(MelSpectrogram=MelSpectrogram)
    try:
        yield
    finally:
        ta.transforms = before
