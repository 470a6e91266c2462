"""An aligntk plugin that cannot be imported, on purpose.

``aligntk plugins`` must list it as broken with this message, and every other
command must go on working with the remaining plugins.
"""

raise RuntimeError("aligntk_broken is broken on purpose")
