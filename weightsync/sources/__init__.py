"""Trainer-side weight sources (``base``), transformers' checkpoint names (``hf_names``) and
sharded trainers on several ranks (``sharded``)."""

from weightsync.sources.base import (
                                     BucketFeed,
                                     IteratorSource,
                                     ModuleSource,
                                     TensorsSource,
                                     WeightSource,
                                     as_source,
)

__all__ = ["BucketFeed", "IteratorSource", "ModuleSource", "TensorsSource", "WeightSource",
           "as_source"]
