"""The model library: open_clip architectures (DataComp's and the project's small ones), loading and checkpoints.

Kept apart from the training and embedding applications, as open_clip keeps its model code apart from its trainer.
"""

from datafilter.models.loading import (
    PROJECT_MODELS,
    CheckpointError,
    LoadedModel,
    ModelSpec,
    create_model,
    input_size,
    load_model,
    pick_device,
    read_checkpoint,
    save_checkpoint,
)

__all__ = ["PROJECT_MODELS", "CheckpointError", "LoadedModel", "ModelSpec", "create_model", "input_size",
           "load_model", "pick_device", "read_checkpoint", "save_checkpoint"]
