"""DataComp's released metadata (parquet + npz) loads as is, and broken folders fail naming the file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from datafilter.embed.datacomp import DataCompMetadata
from datafilter.embed.store import EmbeddingError
from datafilter.pool import hex_to_uids


def _unit(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.normal(size=(n, d)).astype(np.float32)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16)


def write_fake_datacomp(path: Path, rows=(5, 3), seed: int = 0) -> dict[str, np.ndarray]:
    """A folder in DataComp's metadata layout; returns the arrays written, concatenated."""
    rng = np.random.default_rng(seed)
    path.mkdir(parents=True)
    out: dict[str, list] = {"uid": [], "b32_img": [], "b32_txt": [], "l14_img": [], "l14_txt": [],
                            "clip_b32_similarity_score": [], "clip_l14_similarity_score": []}
    for shard, n in enumerate(rows):
        arrays = {"b32_img": _unit(rng, n, 512), "b32_txt": _unit(rng, n, 512),
                  "l14_img": _unit(rng, n, 768), "l14_txt": _unit(rng, n, 768)}
        uids = [f"{rng.integers(0, 2**63):016x}{rng.integers(0, 2**63):016x}" for _ in range(n)]
        scores = {m: (arrays[f"{m}_img"].astype(np.float32) * arrays[f"{m}_txt"]).sum(1) for m in ("b32", "l14")}
        table = pa.table({"uid": uids, "url": [f"http://example.com/{i}.jpg" for i in range(n)],
                          "text": [f"caption {i}" for i in range(n)],
                          "original_width": pa.array([640] * n, pa.int64()),
                          "original_height": pa.array([480] * n, pa.int64()),
                          "clip_b32_similarity_score": scores["b32"], "clip_l14_similarity_score": scores["l14"],
                          "sha256": ["0" * 64] * n})
        pq.write_table(table, path / f"{shard:08d}.parquet")
        np.savez(path / f"{shard:08d}.npz", **arrays)
        out["uid"] += uids
        for k, v in arrays.items():
            out[k].append(v)
        for m in ("b32", "l14"):
            out[f"clip_{m}_similarity_score"].append(scores[m])
    return {k: (np.concatenate(v) if k != "uid" else np.array(v)) for k, v in out.items()}


@pytest.mark.parametrize("model,dim", [("b32", 512), ("l14", 768)])
def test_datacomp_metadata_loads_as_is(tmp_path, model, dim):
    written = write_fake_datacomp(tmp_path / "meta")
    meta = DataCompMetadata(tmp_path / "meta", model=model)
    assert meta.num_samples == 8 and meta.offsets.tolist() == [0, 5, 8]
    assert meta.uids.dtype == np.dtype("u8,u8") and (meta.uids == hex_to_uids(written["uid"])).all()
    image, text = meta.all_image(), meta.all_text()
    assert image.dtype == np.float16 and image.shape == (8, dim)
    assert np.array_equal(image, written[f"{model}_img"]) and np.array_equal(text, written[f"{model}_txt"])
    scores = meta.all_scores()
    assert scores.column_names == ["uid", "valid", f"clip_{model}_similarity_score"]
    np.testing.assert_allclose(scores.column(2).to_numpy(), written[f"clip_{model}_similarity_score"], rtol=1e-6)
    assert scores.column("valid").to_pylist() == [True] * 8
    assert meta.metadata(["text", "original_width"]).num_rows == 8
    assert meta.column("text")[5] == "caption 0"


def test_zero_embedding_rows_are_not_valid(tmp_path):
    write_fake_datacomp(tmp_path / "meta")
    npz_path = tmp_path / "meta" / "00000001.npz"
    arrays = dict(np.load(npz_path))
    arrays["l14_img"][1] = 0
    np.savez(npz_path, **arrays)
    valid = DataCompMetadata(tmp_path / "meta").valid()
    assert valid.tolist() == [True] * 6 + [False, True]


def test_row_count_mismatch_names_the_npz(tmp_path):
    write_fake_datacomp(tmp_path / "meta")
    npz_path = tmp_path / "meta" / "00000000.npz"
    arrays = {k: v[:4] for k, v in np.load(npz_path).items()}
    np.savez(npz_path, **arrays)
    meta = DataCompMetadata(tmp_path / "meta", model="b32")
    with pytest.raises(EmbeddingError, match=r"00000000\.npz: b32_img has shape \(4, 512\) but 00000000\.parquet "
                                             r"has 5 rows"):
        meta.all_image()


def test_missing_npz_or_key_is_a_clear_error(tmp_path):
    write_fake_datacomp(tmp_path / "meta")
    npz_path = tmp_path / "meta" / "00000001.npz"
    arrays = dict(np.load(npz_path))
    del arrays["l14_txt"]
    np.savez(npz_path, **arrays)
    with pytest.raises(EmbeddingError, match=r"00000001\.npz: no array 'l14_txt'"):
        DataCompMetadata(tmp_path / "meta", model="l14").all_text()
    npz_path.unlink()
    with pytest.raises(EmbeddingError, match=r"00000001\.npz"):
        DataCompMetadata(tmp_path / "meta")
    with pytest.raises(ValueError, match="b32, l14"):
        DataCompMetadata(tmp_path / "meta", model="h14")
