"""Checkpoint layouts other than the library folders every family loads: single files in the
original (LDM / SGM) layout, read through diffusers and written back for other tools."""
