"""Binary codes in a FAISS index, searched by Hamming distance (docs/method.md §12). FAISS is
imported only here (the `index` extra: pip install -e .[index]).

An index file (.npz, written atomically, read without pickles) holds the serialised FAISS
binary index, the video names in index order, and a JSON record: the run id and config
fingerprint of the model that made the codes, the code length, the kind of index and its
settings. Codes are packed B/8 bytes per video (bit j of a code is 1 where the ±1 code is +1).

Kinds: 'flat' (IndexBinaryFlat, exact: the same ranking as this repository's evaluation, ties
by index position), 'ivf' (IndexBinaryIVF: codes bucketed by their nearest of `nlist` coarse
centroids, `nprobe` buckets searched) and 'hnsw' (IndexBinaryHNSW, a graph of `hnsw_m`
neighbours per code). Adding videos appends; the approximate kinds are trained when built.
"""
import io
import json
import zipfile

import numpy as np

from utils.errors import UserError
from utils.fileio import atomic_path, check_file
from utils.schema import check_structure

KINDS = ("flat", "ivf", "hnsw")
META_SPEC = {"run_id": str, "config_fingerprint": str, "nbits": int, "kind": str,
             "params": dict, "count": int}
SOURCE_SPEC = {"file": str, "sha256": str, "videos": int}     # a features file it was made from


class IndexFileError(UserError):
    """An index file that cannot be used as asked."""


def import_faiss():
    try:
        import faiss
    except ImportError:
        raise UserError("the index needs FAISS: pip install -e .[index]") from None
    return faiss


def pack_codes(codes):
    """(N, B) ±1 codes (any real array or tensor) -> (N, B/8) uint8, bit j = code j > 0."""
    codes = np.asarray(codes.cpu() if hasattr(codes, "cpu") else codes)
    if codes.ndim != 2 or codes.shape[1] % 8:
        raise IndexFileError(f"codes must be (N, B) with B a multiple of 8, got {codes.shape}")
    return np.packbits(codes > 0, axis=1, bitorder="little")


class CodeIndex:
    """A FAISS binary index with the names and the record of what its codes are."""

    def __init__(self, index, names, meta):
        self.index, self.names, self.meta = index, list(names), meta

    @classmethod
    def build(cls, codes, names, run_id, fingerprint, kind="flat", nlist=1024, hnsw_m=32,
              nprobe=16):
        """An index of `kind` over (N, B) ±1 codes."""
        faiss = import_faiss()
        if kind not in KINDS:
            raise IndexFileError(f"--kind must be one of {list(KINDS)}, got {kind!r}")
        packed = pack_codes(codes)
        nbits = packed.shape[1] * 8
        params = {}
        if kind == "flat":
            index = faiss.IndexBinaryFlat(nbits)
        elif kind == "ivf":
            nlist = max(1, min(nlist, len(packed) // 39 or 1))   # FAISS wants 39 codes a list
            index = faiss.IndexBinaryIVF(faiss.IndexBinaryFlat(nbits), nbits, nlist)
            index.train(packed)
            index.nprobe = min(nprobe, nlist)
            params = {"nlist": nlist, "nprobe": index.nprobe}
        else:
            index = faiss.IndexBinaryHNSW(nbits, hnsw_m)
            params = {"hnsw_m": hnsw_m}
        built = cls(index, [], {"run_id": run_id, "config_fingerprint": fingerprint,
                                "nbits": nbits, "kind": kind, "params": params, "count": 0})
        built.add(codes, names)
        return built

    def add(self, codes, names):
        """Append (N, B) ±1 codes of the videos `names`."""
        packed = pack_codes(codes)
        if packed.shape[1] * 8 != self.meta["nbits"]:
            raise IndexFileError(f"codes of {packed.shape[1] * 8} bits cannot join an index of "
                              f"{self.meta['nbits']}-bit codes")
        if len(names) != len(packed):
            raise IndexFileError(f"{len(packed)} codes but {len(names)} names")
        self.index.add(packed)
        self.names += list(names)
        self.meta["count"] = len(self.names)

    def search(self, codes, k, nprobe=None):
        """(distances (Q, k) int, positions (Q, k) int) of the k nearest by Hamming distance,
        nearest first, ties by position in the index; -1 where fewer than k were found."""
        packed = pack_codes(codes)
        if packed.shape[1] * 8 != self.meta["nbits"]:
            raise IndexFileError(f"queries of {packed.shape[1] * 8} bits cannot search an index of "
                              f"{self.meta['nbits']}-bit codes")
        if nprobe is not None and self.meta["kind"] == "ivf":
            self.index.nprobe = nprobe
        distances, positions = self.index.search(packed, min(k, len(self.names)))
        return distances.astype(np.int64), positions.astype(np.int64)

    def save(self, path):
        faiss = import_faiss()
        blob = faiss.serialize_index_binary(self.index)
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.savez(f, faiss=np.asarray(blob, dtype=np.uint8),
                     names=np.array(self.names, dtype=np.str_),
                     meta=np.array(json.dumps(self.meta)))

    @classmethod
    def load(cls, path):
        faiss = import_faiss()
        check_file(path, "index")
        try:
            with open(path, "rb") as f:
                data = np.load(io.BytesIO(f.read()), allow_pickle=False)
                blob, names, meta = data["faiss"], data["names"], str(data["meta"])
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:
            raise IndexFileError(f"{path}: not an index of this project ({type(err).__name__})") \
                from None
        try:
            meta = json.loads(meta)
        except ValueError:
            raise IndexFileError(f"{path}: its record is not JSON") from None
        check_structure(meta, META_SPEC, path)
        if "sources" in meta:
            check_structure(meta["sources"], [SOURCE_SPEC], path, "sources")
        if meta["kind"] not in KINDS:
            raise IndexFileError(f"{path}: its record names the kind {meta['kind']!r}, not one "
                                 f"of {list(KINDS)}")
        try:
            index = faiss.deserialize_index_binary(blob)
        except RuntimeError as err:
            raise IndexFileError(f"{path}: its FAISS index does not load ({err})") from None
        if index.ntotal != len(names) or len(names) != meta["count"] or \
                index.d != meta["nbits"]:
            raise IndexFileError(f"{path}: its index, names and record do not agree (codes "
                              f"{index.ntotal}, names {len(names)}, record {meta['count']})")
        return cls(index, [str(n) for n in names], meta)
