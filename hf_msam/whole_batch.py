"""The whole-batch step now lives in `hf_msam.engine.whole_batch`; this module keeps the import path working."""

from .engine.whole_batch import whole_batch_step

whole_batch_backward = whole_batch_step  # the name before the engine package

__all__ = ["whole_batch_backward", "whole_batch_step"]
