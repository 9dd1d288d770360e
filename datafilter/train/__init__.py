"""Fixed-budget CLIP training (DataComp's recipe) and the offline scorer model trained the same way."""

from datafilter.train.config import SCALES, Scale, TrainConfig, scale_config
from datafilter.train.loop import TrainResult, read_metrics, train
from datafilter.train.schedule import lr_at

__all__ = ["SCALES", "Scale", "TrainConfig", "TrainResult", "lr_at", "read_metrics", "scale_config", "train"]
