"""mmsurgery: cross-modal weight surgery (Multimodal Pathway, CVPR 2024) on transformer checkpoints.

The public API lives in the modules named for what they do (importing this package stays light, so reading a
safetensors header never imports torch):

    mmsurgery.checkpoint.open_checkpoint, write_safetensors   read any checkpoint lazily; write atomically
    mmsurgery.describe.describe                               what `mmsurgery inspect` shows
    mmsurgery.paired_format.open_paired                       open a paired checkpoint: pathways and λ, checked
    mmsurgery.pairing.pair                                    align two models, write the paired checkpoint
    mmsurgery.pathway.attach, fold, param_groups, scales      train with the pathway in any nn.Module
    mmsurgery.fold.fold_file                                  the streaming file fold
    mmsurgery.verify.verify                                   the deployment gate
"""

__version__ = "0.1.0"
