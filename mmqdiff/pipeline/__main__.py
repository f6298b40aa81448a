"""``python -m mmqdiff.pipeline``: the main job (see :mod:`mmqdiff.pipeline`)."""
from . import cli_main

cli_main()
