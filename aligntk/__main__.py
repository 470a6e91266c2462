"""``python -m aligntk``: the same as the ``aligntk`` command (handy under ``torchrun -m``)."""

from .cli import main

main()
