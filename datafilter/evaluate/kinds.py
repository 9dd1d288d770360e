"""Task kinds: how a task's records are parsed (in the decoding workers) and scored (in the main process), found
through ``KINDS`` by the task's ``type``.

The model side is ``Encoder``: both towers on the model's device in the precision DataComp evaluates with. On a GPU
that is mixed precision (fp16 autocast) for the text tower building classifiers (CLIP_benchmark's
``zero_shot_classifier`` runs with ``amp=True``) while classification image features stay fp32 (DataComp calls
``run_classification`` with ``amp=False``), and fp16 autocast for both towers in retrieval and WinoGAViL. On a CPU
everything is fp32 (CLIP_benchmark 1.4's ``torch.cuda.amp.autocast`` does nothing there). Embeddings are normalised
in fp32 either way, as ``F.normalize`` promotes them under autocast.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
from typing import Any, Iterable

import numpy as np
import torch

from datafilter.embed.decode import ImageDecoder
from datafilter.evaluate.metrics import (
    class_embeddings,
    retrieval_chance,
    retrieval_metrics,
    topk,
    winogavil_metrics,
)
from datafilter.evaluate.scorers import MetadataError, Scorer, get_scorer
from datafilter.evaluate.suite import SuiteError
from datafilter.pool.images import to_rgb

log = logging.getLogger(__name__)

# (text tower, image tower) on a GPU, as DataComp's evaluation runs them.
GPU_PRECISION = {"classification": ("fp16", "fp32"), "retrieval": ("fp16", "fp16"), "winogavil": ("fp16", "fp16")}
PRECISIONS = ("auto", "fp32")


def convert_rgb(img):
    """webdataset's ``ImageHandler("pil")``: PIL's own conversion (transparent pixels keep their colour values)."""
    return img.convert("RGB")


RGB = {"rgb": convert_rgb, "white": to_rgb, "transform": None}


class Encoder:
    """A loaded model (``datafilter.models.LoadedModel`` or anything with ``preprocess``, ``encode_images`` and
    ``encode_texts``) run in DataComp's precision; ``precision="fp32"`` keeps a GPU in fp32 throughout."""

    def __init__(self, model, batch_size: int = 256, precision: str = "auto"):
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
        self.model = model
        self.batch_size = batch_size
        self.device = torch.device(getattr(model, "device", "cpu"))
        self.gpu_mixed = self.device.type == "cuda" and precision == "auto"
        # Zero-shot classifiers by their prompts: an ImageNet and its distribution shifts share class names and
        # templates, so one suite evaluation encodes those prompts once, not once per task.
        self.classifiers: dict[tuple, torch.Tensor] = {}

    def precision(self, kind: str) -> tuple[str, str]:
        return GPU_PRECISION[kind] if self.gpu_mixed else ("fp32", "fp32")

    def decoder(self, task) -> ImageDecoder:
        return ImageDecoder(self.model.preprocess, int(getattr(self.model, "image_size", 0) or 0),
                            rgb=RGB[task.decode_mode])

    def _autocast(self, precision: str):
        if precision == "fp16" and self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.float16)
        return contextlib.nullcontext()

    @torch.inference_mode()
    def images(self, images: torch.Tensor, normalise, precision: str) -> torch.Tensor:
        with self._autocast(precision):
            out = self.model.encode_images(normalise(images))
        return torch.nn.functional.normalize(out.float(), dim=-1)

    @torch.inference_mode()
    def texts(self, texts: list[str], precision: str) -> torch.Tensor:
        out = []
        for s in range(0, len(texts), self.batch_size):
            with self._autocast(precision):
                emb = self.model.encode_texts(texts[s : s + self.batch_size])
            out.append(torch.nn.functional.normalize(emb.float(), dim=-1).to(self.device))
        return torch.cat(out)


def _sorted(per_batch: dict[tuple, Any]) -> list[Any]:
    return [per_batch[k] for k in sorted(per_batch)]


class Collector:
    """A task's per-sample results (top-5, labels, embeddings...) in a few large arrays, filled as batches arrive in
    any order and put in task order at the end.

    Why not a small array per batch: glibc raises its mmap threshold to the size of the model's large transient
    buffers once they are freed, and small long-lived arrays allocated between those buffers then pin its heap, so
    resident memory grew with the task's length (by about 4 KB an image on the micro model). A few large arrays,
    allocated up front and doubled when full, keep a task's memory flat.
    """

    def __init__(self, capacity: int = 65536):
        self.capacity = max(1, capacity)
        self.columns: list[np.ndarray] | None = None
        self.n = 0
        self.spans: list[tuple[tuple, int, int]] = []  # (order, start, rows)

    def add(self, order: tuple, *arrays: np.ndarray) -> None:
        rows = len(arrays[0])
        if self.columns is None:
            self.columns = [np.empty((max(self.capacity, rows),) + a.shape[1:], a.dtype) for a in arrays]
        if len(self.columns) != len(arrays) or any(c.shape[1:] != a.shape[1:] for c, a in zip(self.columns, arrays)):
            raise ValueError("batches disagree in the shape of their per-sample results")
        while self.n + rows > len(self.columns[0]):
            self.columns = [np.concatenate([c, np.empty_like(c)]) for c in self.columns]
        for c, a in zip(self.columns, arrays):
            c[self.n : self.n + rows] = a
        self.spans.append((order, self.n, rows))
        self.n += rows

    def __len__(self) -> int:
        return self.n

    def result(self) -> list[np.ndarray]:
        """Each column in task order (by batch order)."""
        if self.columns is None:
            return []
        index = np.concatenate([np.arange(s, s + r) for _, s, r in sorted(self.spans, key=lambda x: x[0])])
        return [c[index] for c in self.columns]


def _scored(batches: Iterable[dict[str, Any]]) -> Iterable[dict[str, Any]]:
    for b in batches:
        if b.get("error"):
            raise SuiteError(b["error"])
        yield b


class Kind:
    type = ""
    images_per_record = 1
    metrics: tuple[str, ...] = ()

    def main_metrics(self, scorer: Scorer) -> tuple[str, ...]:
        return self.metrics

    def block(self, batch_size: int) -> int:
        return max(1, batch_size // self.images_per_record)

    def parse(self, record, task) -> Any:
        raise NotImplementedError

    def evaluate(self, task, encoder: Encoder, batches: Iterable[dict[str, Any]]) -> dict[str, Any]:
        raise NotImplementedError


class Classification(Kind):
    """Zero-shot classification: templates x class names -> one classifier row per class; each image's top-5
    classes are kept (not its logits), which is all any of DataComp's classification metrics needs."""

    type = "classification"

    def main_metrics(self, scorer: Scorer) -> tuple[str, ...]:
        return scorer.main_metrics

    def parse(self, record, task) -> tuple[int, np.ndarray | None]:
        f = record.fields
        if "cls" not in f:
            raise ValueError(f"sample {record.key} has no .cls label")
        try:
            label = int(f["cls"].decode().strip())
        except ValueError:
            raise ValueError(f"sample {record.key} has label {f['cls'][:20]!r}, not an integer") from None
        meta = None
        if "npy" in f:
            try:
                meta = np.atleast_1d(np.load(io.BytesIO(f["npy"]), allow_pickle=False)).astype(np.float64)
            except (ValueError, OSError) as exc:
                raise ValueError(f"sample {record.key}: unreadable .npy metadata ({exc})") from None
        return label, meta

    @torch.inference_mode()
    def classifier(self, task, encoder: Encoder, classnames: list[str], templates: list[str]) -> torch.Tensor:
        """``[classes, dim]`` on the model's device, a few classes' prompts at a time."""
        precision = encoder.precision(self.type)[0]
        prompts = [task.prompts(c, templates) for c in classnames]
        key = (precision, tuple(tuple(p) for p in prompts))
        if key in encoder.classifiers:
            return encoder.classifiers[key]
        per = max(1, encoder.batch_size // len(templates))
        rows = []
        for s in range(0, len(classnames), per):
            chunk = prompts[s : s + per]
            emb = encoder.texts([p for ps in chunk for p in ps], precision).view(len(chunk), len(templates), -1)
            rows.append(class_embeddings(emb))
        encoder.classifiers[key] = torch.cat(rows)
        return encoder.classifiers[key]

    def evaluate(self, task, encoder: Encoder, batches) -> dict[str, Any]:
        classnames, templates = task.classnames(), task.templates()
        scorer = get_scorer(task.scorer)
        classifier = self.classifier(task, encoder, classnames, templates)
        image_precision = encoder.precision(self.type)[1]
        decoder = encoder.decoder(task)
        normalise = decoder.normaliser(encoder.device)
        got = Collector(task.size or 65536)
        for b in _scored(batches):
            labels, metadata = self._checked(b, len(classnames), scorer)
            emb = encoder.images(b["images"], normalise, image_precision)
            top = topk(emb @ classifier.T, 5).to(torch.int32).cpu().numpy()
            try:  # kept per sample: the top 5 classes, the label and the metadata row
                got.add(b["order"], top, labels, *([] if metadata is None else [metadata]))
            except ValueError:
                raise MetadataError("samples' .npy metadata rows have different lengths") from None
        if not len(got):
            raise SuiteError(f"no samples in {task.split_dir}")
        top, labels, *rest = got.result()
        metadata = rest[0] if rest else None
        metrics = scorer(top, labels, metadata, len(classnames))
        empty = len(classnames) - len(np.unique(labels))
        if empty:
            log.warning("task %s: %d of %d classes have no test samples; mean per-class recall averages the %d "
                        "present, as DataComp's does", task.name, empty, len(classnames), len(classnames) - empty)
        return {"metrics": metrics, "num_samples": len(labels), "num_classes": len(classnames),
                "num_templates": len(templates), "classes_without_samples": empty,
                "chance": classification_chance(task.metric, len(classnames))}

    @staticmethod
    def _checked(batch: dict[str, Any], num_classes: int, scorer: Scorer) -> tuple[np.ndarray, np.ndarray | None]:
        """A batch's labels (checked against the class names) and, where the scorer groups, metadata rows."""
        labels = np.array([e[0] for e in batch["extras"]], np.int64)
        bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
        if len(bad):
            raise SuiteError(f"sample {batch['keys'][bad[0]]} has label {labels[bad[0]]}, but classnames.txt has "
                             f"{num_classes} classes")
        if not scorer.needs_metadata:
            return labels, None
        rows = [e[1] for e in batch["extras"]]
        missing = [k for k, r in zip(batch["keys"], rows) if r is None]
        if missing:
            raise MetadataError(f"sample {missing[0]} has no .npy metadata, which the {scorer.name} metrics need "
                                f"(columns {', '.join(scorer.fields)})")
        if len({len(r) for r in rows}) > 1:
            raise MetadataError("samples' .npy metadata rows have different lengths")
        return labels, np.stack(rows)


def classification_chance(metric: str, num_classes: int) -> float:
    """A uniformly random classifier's expected score (top-5 metrics: 5 / classes)."""
    k = 5 if "top5" in metric or metric == "acc5" else 1
    return min(k, num_classes) / num_classes


class Retrieval(Kind):
    """Image-text retrieval: every image against every caption (several captions per image)."""

    type = "retrieval"
    metrics = ("mean_recall@1", "image_retrieval_recall@1", "text_retrieval_recall@1")

    def parse(self, record, task) -> list[str]:
        f = record.fields
        if task.format == "hf":
            captions = f.get("caption")
            captions = [captions] if isinstance(captions, str) else list(captions or [])
        else:
            if "txt" not in f:
                raise ValueError(f"sample {record.key} has no captions (.txt)")
            captions = f["txt"].decode("utf-8").splitlines()  # CLIP_benchmark: str.splitlines, lines as they are
        if not captions:
            raise ValueError(f"sample {record.key} has no captions")
        return captions

    def evaluate(self, task, encoder: Encoder, batches) -> dict[str, Any]:
        text_precision, image_precision = encoder.precision(self.type)
        normalise = encoder.decoder(task).normaliser(encoder.device)
        images, texts = Collector(task.size or 8192), Collector(5 * (task.size or 8192))
        for b in _scored(batches):
            captions = [c for caps in b["extras"] for c in caps]
            counts = np.array([len(c) for c in b["extras"]])
            images.add(b["order"], encoder.images(b["images"], normalise, image_precision).cpu().numpy(), counts)
            texts.add(b["order"], encoder.texts(captions, text_precision).cpu().numpy())
        if not len(images):
            raise SuiteError(f"no samples in task {task.name}")
        (image_emb, counts), (text_emb,) = images.result(), texts.result()
        image_emb, text_emb = torch.from_numpy(image_emb), torch.from_numpy(text_emb)
        text_image = torch.repeat_interleave(torch.arange(len(counts)), torch.from_numpy(counts))
        metrics = retrieval_metrics(image_emb, text_emb, text_image)
        return {"metrics": metrics, "num_samples": len(image_emb), "num_captions": len(text_emb),
                "chance": retrieval_chance(len(image_emb), text_image.numpy())}


def winogavil_prompt(cue: str) -> str:
    """DataComp's prompt for a WinoGAViL cue: "An ..." before a vowel, "A ..." otherwise, lower-cased."""
    cue = cue.lower()
    return f"An {cue}" if cue[:1] in ("a", "e", "i", "o", "u") else f"A {cue}"


class WinoGAViL(Kind):
    """WinoGAViL: choose the cue's associations among 5-12 candidate images (DataComp's ``wino_eval``)."""

    type = "winogavil"
    images_per_record = 10
    metrics = ("jaccard_score_10-12", "jaccard_score_5-6", "avg_jaccard_score")

    def parse(self, record, task) -> tuple[str, np.ndarray]:
        f = record.fields
        for k in ("cue", "candidates", "associations"):
            if k not in f:
                raise ValueError(f"row {record.key} has no {k!r}")
        if not f["cue"]:
            raise ValueError(f"row {record.key} has an empty cue")
        truth = np.isin(np.asarray(f["candidates"]), np.asarray(f["associations"]))
        if len(truth) != len(record.images):
            raise ValueError(f"row {record.key}: {len(record.images)} candidate images for {len(truth)} candidates")
        return winogavil_prompt(f["cue"]), truth

    def evaluate(self, task, encoder: Encoder, batches) -> dict[str, Any]:
        text_precision, image_precision = encoder.precision(self.type)
        normalise = encoder.decoder(task).normaliser(encoder.device)
        got: dict[tuple, list[tuple[np.ndarray, np.ndarray]]] = {}
        for b in _scored(batches):
            images = encoder.images(b["images"], normalise, image_precision)
            cues = encoder.texts([e[0] for e in b["extras"]], text_precision)
            if image_precision == "fp16":  # DataComp's similarities come out of an fp16 matmul under autocast
                images, cues = images.half(), cues.half()
            out, start = [], 0
            for i, (n, (_, truth)) in enumerate(zip(b["counts"], b["extras"])):
                scores = (cues[i : i + 1] @ images[start : start + n].T).float().squeeze(0).cpu().numpy()
                out.append((scores, truth))
                start += n
            got[b["order"]] = out
        instances = [x for part in _sorted(got) for x in part]
        if not instances:
            raise SuiteError(f"no instances in task {task.name}")
        return {"metrics": winogavil_metrics(instances), "num_samples": len(instances),
                "num_images": int(sum(len(s) for s, _ in instances)),
                "chance": winogavil_chance(instances, task.metric)}


def winogavil_chance(instances: list[tuple[np.ndarray, np.ndarray]], metric: str) -> float | None:
    """Expected Jaccard index of a random choice of n of m candidates (n true), averaged over the instances the
    metric covers: the chosen set shares k ~ Hypergeometric(m, n, n) with the truth, and J = k / (2n - k)."""
    lo, hi = {"jaccard_score_10-12": (10, 99), "jaccard_score_5-6": (0, 6)}.get(metric, (0, 99))
    values = []
    for scores, truth in instances:
        m, n = len(scores), int(np.sum(truth))
        if not lo <= m <= hi or n == 0:
            continue
        values.append(sum(math.comb(n, k) * math.comb(m - n, n - k) / math.comb(m, n) * k / (2 * n - k)
                          for k in range(max(0, 2 * n - m), n + 1)))
    return float(np.mean(values)) if values else None


KINDS: dict[str, Kind] = {k.type: k for k in (Classification(), Retrieval(), WinoGAViL())}


def get_kind(name: str) -> Kind:
    if name not in KINDS:
        raise KeyError(f"type must be one of {', '.join(KINDS)}, not {name!r}")
    return KINDS[name]
