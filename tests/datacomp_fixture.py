"""A tiny copy of DataComp's evaluation download (``download_evalsets.py``'s layout), and a model with known answers.

``DATA_DIR/wds_<task>_test/``: CLIP_benchmark's webdataset folders (``.cls`` labels, ``.npy`` metadata rows for the
WILDS and fairness tasks); ``DATA_DIR/hf_cache/``: Hugging Face ``datasets`` caches of Flickr, MSCOCO and
WinoGAViL, written with ``datasets``' own ``ArrowWriter`` and ``DatasetInfo`` where ``load_dataset`` puts them.
Images are solid colours; ``PaletteModel`` embeds an image as its nearest palette colour and a text as the first
palette colour it names, so every score below can be worked out by hand.
"""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

PALETTE = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (30, 60, 220), "yellow": (240, 220, 40),
           "purple": (130, 40, 160), "orange": (250, 140, 20), "black": (10, 10, 10), "white": (250, 250, 250)}
NAMES = list(PALETTE)


class PaletteModel:
    name = "palette-model"
    checkpoint_id = "fixed"
    embed_dim = len(PALETTE)

    def preprocess(self, img):
        return torch.from_numpy(np.asarray(img.convert("RGB"), np.float32)).permute(2, 0, 1)

    def encode_images(self, x):
        ref = torch.tensor(list(PALETTE.values()), dtype=torch.float32)
        idx = torch.cdist(x.float().mean(dim=(2, 3)), ref).argmin(1)
        return torch.nn.functional.one_hot(idx, len(PALETTE)).float()

    def encode_texts(self, texts):
        out = torch.zeros(len(texts), len(PALETTE))
        for i, t in enumerate(texts):
            hits = [(t.find(c), k) for k, c in enumerate(PALETTE) if c in t]
            if hits:
                out[i, min(hits)[1]] = 1
        return out


def solid_png(colour: str, size: int = 8, mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (size, size), PALETTE[colour] + ((255,) if mode == "RGBA" else ())).save(buf, "PNG")
    return buf.getvalue()


def write_tar(path: Path, samples: list[dict[str, bytes]], start: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tf:
        for i, files in enumerate(samples):
            for ext, data in files.items():
                info = tarfile.TarInfo(f"s{start + i:07d}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))


def _npy(row) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.asarray(row, np.int64))
    return buf.getvalue()


def write_wds_task(folder: Path, classnames: list[str], templates: list[str],
                   samples: list[tuple[str, int, list[int] | None]], shards: int = 1) -> Path:
    """A classification task: samples (image colour, label, metadata row or None)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "classnames.txt").write_text("\n".join(classnames) + "\n")
    (folder / "zeroshot_classification_templates.txt").write_text("\n".join(templates) + "\n")
    per = -(-len(samples) // shards)
    for s in range(shards):
        rows = []
        for colour, label, meta in samples[s * per : (s + 1) * per]:
            files = {"png": solid_png(colour), "cls": str(label).encode()}
            if meta is not None:
                files["npy"] = _npy(meta)
            rows.append(files)
        write_tar(folder / "test" / f"{s}.tar", rows, start=s * per)
    (folder / "test" / "nshards.txt").write_text(f"{shards}\n")
    return folder


def write_hf_split(cache: Path, dataset: str, features, rows: list[dict], split: str = "test") -> Path:
    """Rows of ``dataset`` (``owner/name``) prepared as ``datasets`` prepares them in ``cache``."""
    import datasets
    from datasets.arrow_writer import ArrowWriter

    owner, name = dataset.split("/")
    d = cache / f"{owner}___{name}" / "default" / "0.0.0" / "0123456789abcdef"
    d.mkdir(parents=True, exist_ok=True)
    with ArrowWriter(features=features, path=str(d / f"{name}-{split}.arrow")) as w:
        for r in rows:
            w.write(features.encode_example(r))
        n, nbytes = w.finalize()
    splits = datasets.SplitDict(dataset_name=name)
    splits.add(datasets.SplitInfo(name=split, num_examples=n, num_bytes=nbytes, dataset_name=name))
    datasets.DatasetInfo(features=features, dataset_name=name, config_name="default",
                         splits=splits).write_to_directory(str(d))
    return d


def _image(colour: str) -> dict:
    return {"bytes": solid_png(colour), "path": None}


def retrieval_features():
    import datasets

    return datasets.Features({"image": datasets.Image(), "caption": datasets.Sequence(datasets.Value("string")),
                              "filename": datasets.Value("string")})


def winogavil_features():
    import datasets

    return datasets.Features({"candidate_images": datasets.Sequence(datasets.Image()), "cue": datasets.Value("string"),
                              "candidates": datasets.Sequence(datasets.Value("string")),
                              "associations": datasets.Sequence(datasets.Value("string")),
                              "num_associations": datasets.Value("int64")})


SIX = ["red", "green", "blue", "yellow", "purple", "orange"]

# imagenet1k: 12 samples, 10 right; the two wrong ones show another class's colour.
IMAGENET = [(c, i, None) for i, c in enumerate(SIX)] * 2
IMAGENET[4] = ("red", 4, None)  # purple shown as red: top-5 is red, green, blue, yellow, purple -> top-5 right
IMAGENET[11] = ("red", 5, None)  # orange shown as red: top-5 stops at purple -> wrong
# FMoW: 4 classes; metadata rows [region, year, y]. Regions 0: 2/2 right, 1: 1/2, 2: 1/4, 3: none, 4: 1/1.
FMOW = ([("red", 0, [0, 0, 0]), ("green", 1, [0, 0, 1])] + [("red", 2, [1, 0, 2]), ("blue", 2, [1, 1, 2])]
        + [("red", 1, [2, 1, 1]), ("red", 2, [2, 1, 2]), ("red", 3, [2, 1, 3]), ("red", 0, [2, 1, 0])]
        + [("yellow", 3, [4, 1, 3])])
# GeoDE: metadata [region, country]; region 0: 2/2 right, region 1: 1/3 right.
GEODE = [("red", 0, [0, 7]), ("green", 1, [0, 7]), ("red", 1, [1, 3]), ("red", 2, [1, 3]), ("blue", 2, [1, 4])]
# Dollar Street: 6 classes, metadata [income_ds, income_meta, region]; top-5 right unless the true class is orange
# and the image is red (red's top-5 ends at purple). income 0: 2/2, income 1: 1/2.
DOLLAR = [("red", 0, [0, 10, 1]), ("red", 4, [0, 11, 2]), ("blue", 2, [1, 30, 1]), ("red", 5, [1, 31, 0])]
# iWildCam: 3 classes; predictions red, red, green, blue against labels 0, 1, 1, 2.
IWILDCAM = [("red", 0, [0] * 9), ("red", 1, [0] * 9), ("green", 1, [0] * 9), ("blue", 2, [0] * 9)]
FLICKR = [("red", ["a red car", "red"]), ("green", ["green grass", "a green leaf"]),
          ("blue", ["blue sky", "the sea is blue"]), ("red", ["a red apple", "red fruit"])]
MSCOCO = [("red", ["a red thing"]), ("green", ["a green thing"]), ("blue", ["a blue thing"])]
# WinoGAViL: (cue, candidate colours, associated candidates). Jaccard 1, 1/3 (a three-way tie: DataComp takes the
# later two of c1, c4, c7), 1.
WINO = [("red", ["red", "blue", "red", "green", "yellow"], [0, 2]),
        ("orange", ["blue", "orange", "green", "yellow", "orange", "purple", "black", "orange", "white", "green"],
         [1, 4]),
        ("blue", ["blue"] + ["green"] * 10 + ["blue"], [0, 11])]

EXPECTED_MAIN = {
    "imagenet1k": 10 / 12, "vtab/dtd": 1.0, "wilds/fmow": 0.25, "fairness/geode": 1 / 3,
    "fairness/dollar_street": 0.5, "wilds/iwildcam": 7 / 9, "retrieval/flickr_1k_test_image_text_retrieval": 0.75,
    "retrieval/mscoco_2014_5k_test_image_text_retrieval": 1.0, "misc/winogavil": 2 / 3,
}


def build_download(root: Path) -> Path:
    """A DataComp evaluation folder with 9 of the 38 tasks (every kind and both formats); the rest are missing."""
    root.mkdir(parents=True, exist_ok=True)
    t2 = ["a photo of a {c}.", "a {c} thing"]
    write_wds_task(root / "wds_imagenet1k_test", SIX, t2, IMAGENET, shards=2)
    write_wds_task(root / "wds_vtab-dtd_test", SIX[:3], t2, [(c, i, None) for i, c in enumerate(SIX[:3])] * 2)
    write_wds_task(root / "wds_wilds-fmow_test", SIX[:4], t2, FMOW)
    write_wds_task(root / "wds_wilds-iwildcam_test", SIX[:3], t2, IWILDCAM)
    write_wds_task(root / "wds_geode_test", SIX[:3], t2, GEODE)
    write_wds_task(root / "wds_dollar_street_test", SIX, t2, DOLLAR)
    cache = root / "hf_cache"
    for name, rows in (("flickr_1k_test_image_text_retrieval", FLICKR), ("mscoco_2014_5k_test_image_text_retrieval",
                                                                         MSCOCO)):
        write_hf_split(cache, f"nlphuji/{name}", retrieval_features(),
                       [{"image": _image(c), "caption": caps, "filename": f"{i}.jpg"} for i, (c, caps) in
                        enumerate(rows)])
    write_hf_split(cache, "nlphuji/winogavil", winogavil_features(), [
        {"candidate_images": [_image(c) for c in colours], "cue": cue,
         "candidates": [f"c{i}" for i in range(len(colours))], "associations": [f"c{i}" for i in assoc],
         "num_associations": len(assoc)} for cue, colours, assoc in WINO])
    return root
