"""mmsurgery: cross-modal weight surgery (Multimodal Pathway, CVPR 2024) on transformer checkpoints."""

__version__ = "0.1.0"
