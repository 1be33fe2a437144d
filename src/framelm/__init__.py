"""framelm: FRAME four-quadrant multi-stage pretraining curricula, built and measured."""

__version__ = "0.1.0"
