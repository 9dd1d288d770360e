"""Create and load CLIP models: by open_clip name with a pretrained tag, from a local checkpoint, or freshly initialised.

The project's small architectures (``datafilter-*-vit``) are open_clip configs shipped in ``configs/``; registering
them with open_clip means every open_clip tool (tokenizer, transforms, loss) works on them unchanged.
Checkpoints are always read with ``weights_only=True``: a checkpoint is data, never code.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from datafilter import __version__
from datafilter.common.files import atomic_path, sha256_file
from datafilter.common.hints import did_you_mean

log = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).parent / "configs"
PROJECT_MODELS = tuple(sorted(p.stem for p in CONFIG_DIR.glob("*.json")))
CHECKPOINT_FORMAT = "datafilter-clip-checkpoint-v1"

_registered = False


def _register_project_configs() -> None:
    global _registered
    if not _registered:
        import open_clip

        open_clip.add_model_config(CONFIG_DIR)
        _registered = True


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used with the requested model."""


@dataclass(frozen=True)
class ModelSpec:
    """Which model to use. At most one of ``pretrained`` (an open_clip tag; downloads) and ``checkpoint`` (a file)."""

    name: str
    pretrained: str | None = None
    checkpoint: str | None = None

    def __post_init__(self) -> None:
        if self.pretrained and self.checkpoint:
            raise ValueError("give either a pretrained tag or a checkpoint path, not both")


@dataclass
class LoadedModel:
    model: torch.nn.Module
    preprocess: Callable  # PIL image -> tensor, the model's own evaluation transform
    tokenizer: Callable  # list[str] -> LongTensor
    name: str
    checkpoint_id: str  # "pretrained:TAG", the checkpoint file's sha256, or "random:SEED"
    embed_dim: int
    image_size: int
    meta: dict[str, Any]
    device: torch.device

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.normalize(self.model.encode_image(images.to(self.device)).float(), dim=-1)

    @torch.no_grad()
    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        tokens = self.tokenizer(texts).to(self.device)
        return torch.nn.functional.normalize(self.model.encode_text(tokens).float(), dim=-1)


def pick_device(preference: str = "auto", local_rank: int = 0) -> torch.device:
    """``auto`` takes a GPU when there is one. A GPU without an index (``auto``, ``cuda``) is the process's own:
    ``local_rank`` (from the launcher) modulo the GPUs visible, so that the ranks on one node share them out."""
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if preference == "auto" else preference)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank % max(1, torch.cuda.device_count()))
    return device


def create_model(name: str, seed: int = 0, pretrained: str | None = None, device: str | torch.device = "cpu"):
    """A fresh model (seeded) or one with open_clip pretrained weights; returns (model, train_tf, eval_tf, tokenizer)."""
    import open_clip

    _register_project_configs()
    if name not in open_clip.list_models():
        hint = did_you_mean(name, open_clip.list_models(), n=3)
        raise ValueError(f"unknown model {name!r}{hint}")
    torch.manual_seed(seed)
    # OpenAI's weights were trained with QuickGELU, which open_clip's plain ViT-B-32 / ViT-L-14 configs do not use;
    # without this, "ViT-B-32 + openai" would silently be a different network from the one DataComp scored with.
    quick_gelu = bool(pretrained and open_clip.get_pretrained_cfg(name, pretrained).get("quick_gelu"))
    with _quiet_random_init():
        model, train_tf, eval_tf = open_clip.create_model_and_transforms(name, pretrained=pretrained, device=device,
                                                                         force_quick_gelu=quick_gelu)
    return model, train_tf, eval_tf, open_clip.get_tokenizer(name)


def tokenizer_for(name: str):
    """The open_clip tokenizer of model ``name`` (its context length included), without building the model."""
    import open_clip

    _register_project_configs()
    return open_clip.get_tokenizer(name)


class _DropRandomInitWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("No pretrained weights loaded for model")


@contextlib.contextmanager
def _quiet_random_init() -> Iterator[None]:
    """open_clip warns "No pretrained weights loaded ... initialized randomly" whenever no pretrained tag is given,
    which here is before every checkpoint load and every training run, where random initialisation is the point.
    ``load_model`` says itself when a model really keeps random weights."""
    root = logging.getLogger()  # open_clip logs through the root logger
    flt = _DropRandomInitWarning()
    root.addFilter(flt)
    try:
        yield
    finally:
        root.removeFilter(flt)


def input_size(model: torch.nn.Module) -> int:
    """The side of the square images an open_clip model's image tower takes (its ``image_size``, an int or a
    pair)."""
    size = model.visual.image_size
    return int(size if isinstance(size, int) else size[0])


def _model_dims(model: torch.nn.Module) -> tuple[int, int]:
    """(embedding width, input image size) of an open_clip model."""
    size = input_size(model)
    proj = getattr(model, "text_projection", None)
    if isinstance(proj, torch.nn.Linear):
        dim = proj.out_features
    elif proj is not None:
        dim = proj.shape[1]
    else:
        dim = model.visual.output_dim
    return int(dim), size


def save_checkpoint(model: torch.nn.Module, name: str, path: str | Path, meta: dict[str, Any] | None = None) -> Path:
    """Write a checkpoint that ``load_model`` verifies against the model name. Atomic."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    payload = {"format": CHECKPOINT_FORMAT, "model_name": name, "datafilter_version": __version__,
               "state_dict": state, "meta": meta or {}}
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return path


def _read_checkpoint(path: Path, name: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickles with code, truncated files, non-torch files
        raise CheckpointError(f"{path}: not a loadable weights-only checkpoint ({type(exc).__name__}: {exc})") from None
    meta: dict[str, Any] = {}
    if isinstance(payload, dict) and payload.get("format") == CHECKPOINT_FORMAT:
        if payload["model_name"] != name:
            raise CheckpointError(f"{path} holds a {payload['model_name']!r} model, not {name!r}")
        state, meta = payload["state_dict"], dict(payload.get("meta") or {})
    elif isinstance(payload, dict) and "state_dict" in payload:  # open_clip training checkpoints
        state = payload["state_dict"]
    elif isinstance(payload, dict):
        state = payload
    else:
        raise CheckpointError(f"{path}: expected a state dict, found {type(payload).__name__}")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    return state, meta


def _check_finite(state: dict[str, torch.Tensor], path: Path) -> None:
    """Refuse weights with NaN: such a model scores, embeds and evaluates to NaN (or to a constant argmax that looks
    like an accuracy) without any error. Infinities are allowed, as attention masks legitimately hold them."""
    bad = [k for k, v in state.items() if torch.is_tensor(v) and v.is_floating_point() and torch.isnan(v).any()]
    if bad:
        total = sum(1 for v in state.values() if torch.is_tensor(v) and v.is_floating_point())
        raise CheckpointError(f"{path}: {len(bad)} of {total} weight tensors hold NaN (e.g. {', '.join(bad[:3])}); "
                              f"a model with them embeds and evaluates to NaN. A training run that wrote it "
                              f"diverged: use an earlier checkpoint, or retrain (a lower learning rate, or fp32 "
                              f"instead of amp)")


def read_checkpoint(path: str | Path, name: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state dict, meta) of a checkpoint for model ``name``, read weights-only; a name mismatch is an error."""
    return _read_checkpoint(Path(path), name)


def load_model(spec: ModelSpec, device: str | torch.device = "cpu", seed: int = 0) -> LoadedModel:
    """Load a model for inference (eval mode) and say exactly which weights it has."""
    device = torch.device(device)
    model, _, eval_tf, tokenizer = create_model(spec.name, seed=seed, pretrained=spec.pretrained, device="cpu")
    meta: dict[str, Any] = {}
    if spec.checkpoint:
        path = Path(spec.checkpoint)
        state, meta = _read_checkpoint(path, spec.name)
        _check_finite(state, path)
        result = model.load_state_dict(state, strict=False)
        if result.missing_keys or result.unexpected_keys:
            raise CheckpointError(
                f"{path} does not fit model {spec.name!r}: {len(result.missing_keys)} missing keys (e.g. "
                f"{result.missing_keys[:3]}), {len(result.unexpected_keys)} unexpected (e.g. "
                f"{result.unexpected_keys[:3]})")
        checkpoint_id = sha256_file(path)
    elif spec.pretrained:
        checkpoint_id = f"pretrained:{spec.pretrained}"
    else:
        checkpoint_id = f"random:{seed}"
        log.warning("model %s has random weights (no checkpoint or pretrained tag given)", spec.name)
    model = model.to(device).eval()
    dim, size = _model_dims(model)
    return LoadedModel(model, eval_tf, tokenizer, spec.name, checkpoint_id, dim, size, meta, device)
