"""Official checkpoint files -> LTX2Components.

Lightricks publishes LTX-2 as: one checkpoint safetensors holding the transformer
(`model.diffusion_model.*`), the video VAE (`vae.*`), the audio VAE (`audio_vae.*`), the vocoder
(`vocoder.*`) and the text connectors, with a `config` JSON in its metadata; the distilled LoRA
for stage 2; the x2 spatial upsampler; and the Gemma 3 text encoder folder. ltx-core's model
builders (through ltx-pipelines' ModelLedger, with its key filters) load every part but the DiT;
our loader (models/ltx2/weights.py) loads the DiT onto this rank's TP shard.

`--model-path` may be that folder (files found by name) or the checkpoint file itself, with the
others given by their own flags. Each missing file is reported naming the flag that supplies it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ltx2_tp.distributed.context import SINGLE, ParallelContext
from ltx2_tp.pipelines.request import RequestError

TINY_TEXT_ENCODER = "tiny"  # --text-encoder-path tiny: the embedded stand-in (tests, smoke runs)
TINY_TEXT_KEY = "ltx2_tp_tiny_text_encoder.table.weight"  # its table, when a test checkpoint carries one


@dataclass
class CheckpointFiles:
    checkpoint: str
    spatial_upsampler: str
    text_encoder: str  # Gemma root folder, or "tiny"
    distilled_lora: str | None = None
    distilled_lora_strength: float = 1.0

    @classmethod
    def discover(cls, model_path: str, spatial_upsampler: str | None = None, text_encoder: str | None = None,
                 distilled_lora: str | None = None, distilled_lora_strength: float = 1.0) -> "CheckpointFiles":
        """Resolve the files from a folder as Lightricks lays it out, or from explicit paths."""
        root = Path(model_path)
        if not root.exists():
            raise RequestError("model_path", f"no such file or directory: {model_path}")
        if root.is_file():
            checkpoint, folder = root, root.parent
        else:
            folder = root
            candidates = [p for p in sorted(folder.glob("*.safetensors"))
                          if not any(s in p.name for s in ("upscaler", "upsampler", "lora"))]
            if len(candidates) != 1:
                raise RequestError("model_path", f"expected one LTX-2 checkpoint *.safetensors in {folder} (besides "
                                   f"the upsampler and LoRA files), found {[p.name for p in candidates]}")
            checkpoint = candidates[0]

        def pick(value: str | None, flag: str, patterns: tuple[str, ...], required: bool) -> str | None:
            if value is not None:
                if value != TINY_TEXT_ENCODER and not Path(value).exists():
                    raise RequestError(flag, f"no such file or directory: {value}")
                return value
            for pat in patterns:
                found = sorted(folder.glob(pat))
                if found:
                    return str(found[0])
            if required:
                raise RequestError(flag, f"not given and nothing matching {list(patterns)} in {folder}")
            return None

        return cls(
            checkpoint=str(checkpoint),
            spatial_upsampler=pick(spatial_upsampler, "spatial_upsampler_path",
                                   ("*spatial-upscaler*.safetensors", "*upsampler*.safetensors"), True),
            text_encoder=pick(text_encoder, "text_encoder_path", ("gemma*", "text_encoder"), True),
            distilled_lora=pick(distilled_lora, "distilled_lora_path", ("*distilled-lora*.safetensors",), False),
            distilled_lora_strength=distilled_lora_strength,
        )


class CheckpointTextEncoder(torch.nn.Module):
    """Gemma 3 -> ltx-core's embeddings processor (feature extractor + connectors): prompt ->
    (video context, audio context), as ltx-pipelines' encode_prompts. Both stay resident."""

    def __init__(self, gemma: torch.nn.Module, processor: torch.nn.Module):
        super().__init__()
        self.gemma, self.processor = gemma, processor

    @torch.no_grad()
    def forward(self, prompt: str):
        hidden, mask = self.gemma.encode(prompt)
        out = self.processor.process_hidden_states(hidden, mask)
        return out.video_encoding, out.audio_encoding


def build_checkpoint_components(files: CheckpointFiles, device: str | torch.device = "cpu",
                                dtype: torch.dtype = torch.bfloat16, ctx: ParallelContext = SINGLE):
    from ltx_pipelines.utils.model_ledger import ModelLedger

    from ltx2_tp.models.ltx2.config import LTX2Config
    from ltx2_tp.models.ltx2.lora import LoraWeights
    from ltx2_tp.models.ltx2.weights import build_model, read_checkpoint_config
    from ltx2_tp.pipelines.components import LTX2Components, TinyTextEncoder

    device = torch.device(device)
    meta = read_checkpoint_config([files.checkpoint])
    if meta is None or "transformer" not in meta:
        raise RequestError("model_path", f"{files.checkpoint} carries no 'config' metadata with a transformer entry "
                           "(official LTX-2 checkpoints do)")
    cfg = LTX2Config.from_checkpoint_config(meta)
    cfg.validate_parallel(ctx.tp_size, ctx.ulysses_size)
    gemma = None if files.text_encoder == TINY_TEXT_ENCODER else files.text_encoder
    # VAE / audio / vocoder / upsampler in fp32 on CPU, the working dtype on GPU (as ltx-pipelines)
    aux_dtype = torch.float32 if device.type == "cpu" else dtype
    ledger = ModelLedger(dtype=aux_dtype, device=device, checkpoint_path=files.checkpoint, gemma_root_path=gemma,
                         spatial_upsampler_path=files.spatial_upsampler)
    if gemma is None:
        text_encoder = TinyTextEncoder(cfg.caption_channels).to(device)
        from safetensors import safe_open

        with safe_open(files.checkpoint, framework="pt") as h:
            if TINY_TEXT_KEY in h.keys():
                text_encoder.table.weight.data.copy_(h.get_tensor(TINY_TEXT_KEY))
    else:
        text_encoder = CheckpointTextEncoder(ledger.text_encoder(), ledger.gemma_embeddings_processor())
    vae = meta.get("vae", {})
    audio_vae = meta.get("audio_vae", {})
    ddconfig = audio_vae.get("model", {}).get("params", {}).get("ddconfig", {})
    audio_channels = int(ddconfig.get("z_channels", 8))
    # latent frequency bins: the audio VAE halves the mel axis at each level after the first
    mel_bins = int(ddconfig.get("mel_bins", 64)) // 2 ** (len(ddconfig.get("ch_mult", (1, 2, 4))) - 1)
    lora = (LoraWeights.from_file(files.distilled_lora, files.distilled_lora_strength)
            if files.distilled_lora else None)
    transformer = build_model(cfg, ctx, device=device, dtype=dtype, files=[files.checkpoint])
    return LTX2Components(
        transformer=transformer, video_encoder=ledger.video_encoder(), video_decoder=ledger.video_decoder(),
        upsampler=ledger.spatial_upsampler(), audio_decoder=ledger.audio_decoder(), vocoder=ledger.vocoder(),
        text_encoder=text_encoder, video_latent_channels=int(vae.get("latent_channels", 128)),
        audio_latent_channels=audio_channels, audio_mel_bins=mel_bins, device=device, dtype=dtype,
        name=Path(files.checkpoint).stem, stage2_lora=lora, checkpoint_path=files.checkpoint)


def write_official_files(c, folder: str | Path, lora_rank: int | None = None, seed: int = 0) -> CheckpointFiles:
    """Write `c` (single-rank components with ltx-core parts) as Lightricks lays LTX-2 out: the
    checkpoint (prefixed keys + `config` metadata), the upsampler file and, with `lora_rank`, a
    random distilled LoRA over every DiT linear weight. The tests load these back."""
    import dataclasses
    import json

    from safetensors.torch import save_file

    from ltx2_tp.models.ltx2.weights import COMFY_PREFIX, official_state_dict
    from ltx2_tp.pipelines.components import TINY_AUDIO_VAE, TINY_UPSAMPLER, TINY_VAE, TINY_VOCODER, TinyTextEncoder

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(c.transformer.cfg).items()}
    cfg["frequencies_precision"] = "float64" if c.transformer.cfg.double_precision_rope else "float32"
    config = {"transformer": cfg, **TINY_VAE, **TINY_AUDIO_VAE, **TINY_VOCODER}
    sd = {COMFY_PREFIX + k: v for k, v in official_state_dict(c.transformer).items()}

    def add(module, prefix, stats_prefix=None):
        for k, v in module.state_dict().items():
            if stats_prefix and k.startswith("per_channel_statistics."):
                sd[stats_prefix + k[len("per_channel_statistics."):]] = v
            else:
                sd[prefix + k] = v

    add(c.video_encoder, "vae.encoder.", "vae.per_channel_statistics.")
    add(c.video_decoder, "vae.decoder.", "vae.per_channel_statistics.")
    add(c.audio_decoder, "audio_vae.decoder.", "audio_vae.per_channel_statistics.")
    add(c.vocoder, "vocoder.")
    if isinstance(c.text_encoder, TinyTextEncoder):  # not an official tensor; ltx-core's filters skip it
        sd[TINY_TEXT_KEY] = c.text_encoder.table.weight
    ckpt = folder / "ltx-2-tiny-dev.safetensors"
    save_file({k: v.detach().contiguous() for k, v in sd.items()}, str(ckpt), metadata={"config": json.dumps(config)})
    up = folder / "ltx-2-spatial-upscaler-x2-tiny.safetensors"
    save_file({k: v.detach().contiguous() for k, v in c.upsampler.state_dict().items()}, str(up),
              metadata={"config": json.dumps(TINY_UPSAMPLER)})
    lora = None
    if lora_rank:
        g = torch.Generator().manual_seed(seed)
        pairs = {}
        for k, v in official_state_dict(c.transformer).items():
            if v.ndim == 2 and k.startswith("transformer_blocks.") and k.endswith(".weight"):  # the linears
                base = "diffusion_model." + k[: -len(".weight")]
                pairs[base + ".lora_A.weight"] = torch.randn(lora_rank, v.shape[1], generator=g).to(v.dtype) * 0.1
                pairs[base + ".lora_B.weight"] = torch.randn(v.shape[0], lora_rank, generator=g).to(v.dtype) * 0.1
        lora = folder / "ltx-2-tiny-distilled-lora-384.safetensors"
        save_file(pairs, str(lora))
    return CheckpointFiles(str(ckpt), str(up), TINY_TEXT_ENCODER, str(lora) if lora else None)
