"""Reading (every format, lazily and safely) and atomic writing of checkpoints."""

from mmsurgery.checkpoint.loaded import Checkpoint, TensorInfo
from mmsurgery.checkpoint.reader import open_checkpoint
from mmsurgery.checkpoint.writer import parse_size, write_safetensors

__all__ = ["Checkpoint", "TensorInfo", "open_checkpoint", "parse_size", "write_safetensors"]
