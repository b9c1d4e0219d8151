"""LTX-2 transformer configuration and named presets.

Field names follow ltx-core's `LTXModel.__init__` and the checkpoint's embedded
`config["transformer"]` JSON, so a checkpoint's metadata maps onto this dataclass directly.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass


@dataclass(frozen=True)
class LTX2Config:
    # video stream (None of these matter when has_video is False)
    has_video: bool = True
    num_attention_heads: int = 32
    attention_head_dim: int = 128
    in_channels: int = 128
    out_channels: int = 128
    cross_attention_dim: int = 4096
    positional_embedding_max_pos: tuple[int, ...] = (20, 2048, 2048)
    # audio stream
    has_audio: bool = True
    audio_num_attention_heads: int = 32
    audio_attention_head_dim: int = 64
    audio_in_channels: int = 128
    audio_out_channels: int = 128
    audio_cross_attention_dim: int = 2048
    audio_positional_embedding_max_pos: tuple[int, ...] = (20,)
    # shared
    num_layers: int = 48
    norm_eps: float = 1e-6
    positional_embedding_theta: float = 10000.0
    timestep_scale_multiplier: int = 1000
    av_ca_timestep_scale_multiplier: float = 1.0
    use_middle_indices_grid: bool = True
    rope_type: str = "interleaved"  # "interleaved" | "split"
    double_precision_rope: bool = False  # checkpoint: frequencies_precision == "float64"
    apply_gated_attention: bool = False
    cross_attention_adaln: bool = False
    # Caption projection (3840 -> D) inside the transformer (19B) or in the text encoder (2.3).
    caption_projection: bool = True
    caption_channels: int = 3840
    ff_mult: int = 4
    ff_bias: bool = True  # LTX-2.5: video FFN without bias
    audio_ff_bias: bool = True

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def audio_inner_dim(self) -> int:
        return self.audio_num_attention_heads * self.audio_attention_head_dim

    @property
    def adaln_coefficient(self) -> int:
        # 6 = (shift, scale, gate) x (attention, FFN); cross-attention AdaLN adds 3.
        return 9 if self.cross_attention_adaln else 6

    @property
    def cross_pe_max_pos(self) -> int:
        return max(self.positional_embedding_max_pos[0], self.audio_positional_embedding_max_pos[0])

    def replace(self, **kw) -> "LTX2Config":
        return dataclasses.replace(self, **kw)

    def validate_parallel(self, tp_size: int, ulysses_size: int = 1) -> None:
        """Refuse layouts whose degrees do not divide the head counts (named in the error)."""
        for name, heads in self._head_counts():
            if heads % tp_size:
                raise ValueError(
                    f"tp_size={tp_size} must divide {name}={heads}; allowed tp_size values: "
                    f"{_divisors(heads)}"
                )
            if (heads // tp_size) % ulysses_size:
                raise ValueError(
                    f"ulysses_size={ulysses_size} must divide {name}/tp_size={heads // tp_size}; "
                    f"allowed ulysses_size values: {_divisors(heads // tp_size)}"
                )

    def _head_counts(self):
        if self.has_video:
            yield "num_attention_heads", self.num_attention_heads
        if self.has_audio:
            yield "audio_num_attention_heads", self.audio_num_attention_heads

    # ---- checkpoint metadata -------------------------------------------------------------
    @classmethod
    def from_checkpoint_config(cls, config: dict | str, base: "LTX2Config | None" = None) -> "LTX2Config":
        """Build from the `config` JSON that official safetensors carry in their metadata."""
        if isinstance(config, str):
            config = json.loads(config)
        t = config.get("transformer", config)
        base = base or LTX2Config()
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in t.items() if k in names}
        for k in ("positional_embedding_max_pos", "audio_positional_embedding_max_pos"):
            if k in kw:
                kw[k] = tuple(kw[k])
        if "frequencies_precision" in t:
            kw["double_precision_rope"] = t["frequencies_precision"] == "float64"
        if "caption_proj_before_connector" in t:
            kw["caption_projection"] = not t["caption_proj_before_connector"]
        return dataclasses.replace(base, **kw)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


# Named presets. Facts from ../shared/ltx2.md and the checkpoints' embedded configs.
PRESETS: dict[str, LTX2Config] = {
    # LTX-2 19B audio-video: caption projection in the transformer.
    "ltx-2-19b": LTX2Config(
        rope_type="split", double_precision_rope=True, av_ca_timestep_scale_multiplier=1000.0
    ),
    # LTX-2.3 (22B): gated attention, cross-attention AdaLN, projection in the text encoder.
    "ltx-2.3": LTX2Config(
        rope_type="split",
        double_precision_rope=True,
        av_ca_timestep_scale_multiplier=1000.0,
        apply_gated_attention=True,
        cross_attention_adaln=True,
        caption_projection=False,
    ),
    # LTX-2.5: as 2.3 with the video FFN without bias (sglang's ltx_2_5 config).
    "ltx-2.5": LTX2Config(
        rope_type="split",
        double_precision_rope=True,
        av_ca_timestep_scale_multiplier=1000.0,
        apply_gated_attention=True,
        cross_attention_adaln=True,
        caption_projection=False,
        ff_bias=False,
    ),
    # Tiny: every feature of the real model at a size a CPU runs in milliseconds.
    # Video and audio share the head count so split-RoPE cross embeddings line up as in the real model.
    "tiny": LTX2Config(
        num_attention_heads=4,
        attention_head_dim=8,
        in_channels=16,
        out_channels=16,
        cross_attention_dim=32,
        audio_num_attention_heads=4,
        audio_attention_head_dim=4,
        audio_in_channels=16,
        audio_out_channels=16,
        audio_cross_attention_dim=16,
        num_layers=2,
        caption_channels=24,
    ),
}


def get_config(name: str, **overrides) -> LTX2Config:
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; allowed: {sorted(PRESETS)}")
    return PRESETS[name].replace(**overrides) if overrides else PRESETS[name]


__all__ = ["LTX2Config", "PRESETS", "get_config"]
