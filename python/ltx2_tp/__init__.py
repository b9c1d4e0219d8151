"""ltx2_tp: LTX-2 audio-video DiT with tensor/sequence parallelism and sequence chunking."""

from ltx2_tp.models.ltx2.config import LTX2Config, get_config
from ltx2_tp.models.ltx2.inputs import Modality
from ltx2_tp.models.ltx2.model import LTX2Model

__all__ = ["LTX2Config", "LTX2Model", "Modality", "get_config"]
__version__ = "0.1.0"
