"""The DeepSeek-V3 model family. Imports nothing from torch.distributed."""

from titan_dsv3.models.args import ModelArgs
from titan_dsv3.models.model import DeepSeekV3Model

__all__ = ["ModelArgs", "DeepSeekV3Model"]
