"""Building blocks of the `score` stage: windowing and packing, the model scorer, the Ray executor."""
