"""Family knowledge (a validated table) and structure detection: checkpoint names and shapes → Layout."""

from mmsurgery.layout.detect import Block, Layout, Linear, Stack, choose_stack, default_stack, detect
from mmsurgery.layout.families import FAMILIES, PAIRABLE_ROLES, ROLES, Family

__all__ = [
    "FAMILIES",
    "PAIRABLE_ROLES",
    "ROLES",
    "Block",
    "Family",
    "Layout",
    "Linear",
    "Stack",
    "choose_stack",
    "default_stack",
    "detect",
]
