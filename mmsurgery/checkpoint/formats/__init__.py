"""The checkpoint formats mmsurgery reads, one module each, and `FORMATS`: the one ordered table
`open_checkpoint` walks, the first format that claims a path opening it (docs/formats.md gives the precedence).

Each format module builds a `loaded.Format` (`name`, `claims(path)`, `open(path, key)`, whether it is a `folder`
format) named `FORMAT`. A DCP folder is claimed before anything else looks at a folder; every later format is
asked about a regular file, a folder given standing for the one weights file in it (`folder.weights_file`). A new
format is one module and one entry here.
"""

from mmsurgery.checkpoint.formats import dcp_folder, pickle_file, safetensors_file, sharded
from mmsurgery.checkpoint.loaded import Format

__all__ = ["FORMATS", "Format"]

FORMATS: tuple[Format, ...] = (
    dcp_folder.FORMAT,  # a torch.distributed.checkpoint folder, or its .metadata
    sharded.FORMAT,  # *.index.json: safetensors or pytorch_model.bin shards
    safetensors_file.FORMAT,  # *.safetensors
    pickle_file.FORMAT,  # .pt/.pth/.bin/.ckpt/.pkl/.tar, or a file that starts like torch.save output
)
