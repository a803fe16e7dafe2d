"""A protocol's database and queries, encoded by a model and scored by Hamming ranking."""
import math

import numpy as np
import torch

from inference.encode import NonFiniteCodes, encode
from inference.metrics import retrieval_metrics


def score_codes(db_codes, query_codes, db_labels, query_labels, cfg, device=None):
    """{'mAP': {R: v}, 'precision': {R: v}} for the configured cut-offs R (`eval.topk`)."""
    result = retrieval_metrics(query_codes, db_codes, query_labels, db_labels,
                               topk=tuple(cfg.eval.topk), chunk=cfg.eval.query_chunk,
                               device=device)
    if not all(math.isfinite(v) for part in result.values() for v in part.values()):
        raise NonFiniteCodes(f"non-finite retrieval scores {result['mAP']}")
    return result


class RetrievalSet:
    """Database and queries (labelled VideoSets) of one protocol.

    `resident`: (VideoSet, (n, M, D) tensor) pairs, copies of sets' features already in memory
    (the training features on the device, say). A set whose videos are all rows of one of them
    is encoded from that tensor, one `eval.batch_size` block at a time (not gathered into one
    copy of the whole set first), instead of being read from its file again.
    """

    def __init__(self, name, database, queries, resident=()):
        self.name, self.database, self.queries = name, database, queries
        self._resident = list(resident)

    def _source(self, videos, cfg):
        batch = cfg.eval.batch_size
        for held, features in self._resident:
            if videos.path != held.path or videos.key != held.key:
                continue
            position = {int(r): i for i, r in enumerate(held.rows)}
            if all(int(r) in position for r in videos.rows):
                rows = torch.tensor([position[int(r)] for r in videos.rows],
                                    device=features.device)
                return (features[rows[i:i + batch]] for i in range(0, len(rows), batch))
        return videos.iter_blocks(cfg, batch)

    def _encode(self, model, videos, cfg, device):
        try:
            return encode(model, self._source(videos, cfg), device, cfg.eval.batch_size)
        except NonFiniteCodes as err:
            raise NonFiniteCodes(f"{videos.path}: {err}") from None

    def codes(self, model, cfg, device):
        """(database codes (N, B), query codes (Q, B)); an all-vs-all protocol encodes once."""
        db = self._encode(model, self.database, cfg, device)
        same = self.queries.path == self.database.path and np.array_equal(self.queries.rows,
                                                                          self.database.rows)
        return db, db if same else self._encode(model, self.queries, cfg, device)

    def evaluate(self, model, cfg, device):
        db_codes, query_codes = self.codes(model, cfg, device)
        return score_codes(db_codes, query_codes, self.database.labels, self.queries.labels, cfg,
                           device=device)
