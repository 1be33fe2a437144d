"""Proxy-model pretraining on an exported schedule (the `train` stage).

Modules: `config` (TrainConfig), `data` (stream reading and batch plan), `lr` (schedules),
`loop` (fit / train_model), `checkpoint`, `averaging` (EMA/SMA/WMA of checkpoints),
`distributed` (torchrun). The final models are written as Hugging Face Llama folders by
`framelm.hf_llama`.
"""

from framelm.train.config import TrainConfig
from framelm.train.loop import fit, train_model

__all__ = ["TrainConfig", "fit", "train_model"]
