"""The project's own concept: one quantized model per timestep segment (:class:`SegmentedModel`), and the run folder
that stores them (:mod:`.run_folder`)."""
from .model import SegmentedModel

__all__ = ["SegmentedModel"]
