from mmsurgery.cli import _entry

_entry()
