"""Hard negatives from the decision region: the unrelated neighbours a static threshold would serve.

A cache's false hits are a prompt's nearest *unrelated* cached prompt at high cosine. Labelled pairs
rarely show those to the model: a pair file holds the pairs someone chose to label, not every
prompt's nearest neighbour. So before training, every training prompt is embedded with the model
being fine-tuned, and its nearest prompts that sit in a *different connected component* of the
training pair graph (never linked to it by any labelled pair, positive or negative) are added as
negative pairs, ``per_prompt`` at most per prompt, only where the cosine is ≥ ``min_cos`` (the
region where hits are decided).

The assumption, stated: two prompts that no chain of labelled pairs connects are different
questions. It holds for pair files mined by kNN and labelled by a teacher (the near neighbours are
already labelled, hence connected) and for question-pair sets such as QQP; it is the same assumption
the in-batch contrastive term makes about the other prompts of a batch, applied where it matters.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from raycache.splits import pair_components

BLOCK_ROWS = 1024  # query rows per similarity block ([block, n] float32 in memory)


def mine_hard_negatives(pairs: pd.DataFrame, vectors_of, per_prompt: int, min_cos: float,
                        label: float = 0.0) -> pd.DataFrame:
    """New pairs (prompt_a, prompt_b, label) between nearby prompts of different components.

    ``pairs``: the training pairs (prompt_a, prompt_b, label). ``vectors_of``: callable mapping a
    list of m prompts to unit vectors [m, dim] (e.g. ``Encoder.encode``). Each unordered pair is
    returned once; none duplicates a pair already in ``pairs``.
    """
    if per_prompt <= 0:
        return pairs.iloc[0:0][["prompt_a", "prompt_b", "label"]]
    a, b = pairs["prompt_a"].astype(str).tolist(), pairs["prompt_b"].astype(str).tolist()
    row_comp = pair_components(a, b)
    comp_of: dict[str, int] = {}
    for pa, pb, c in zip(a, b, row_comp.tolist()):
        comp_of[pa] = comp_of[pb] = c
    prompts = list(comp_of)
    comp = np.fromiter((comp_of[p] for p in prompts), dtype=np.int64, count=len(prompts))
    x = np.asarray(vectors_of(prompts), dtype=np.float32)
    seen = {frozenset(p) for p in zip(a, b)}
    out_a, out_b = [], []
    for start in range(0, len(prompts), BLOCK_ROWS):
        rows = np.arange(start, min(start + BLOCK_ROWS, len(prompts)))
        sims = x[rows] @ x.T  # [block, m]
        sims[comp[rows][:, None] == comp[None, :]] = -np.inf  # same component: not a negative
        k = min(per_prompt, sims.shape[1])
        top = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        for r, cols in zip(rows, top):
            for c in cols[np.argsort(-sims[r - start, cols])]:
                if sims[r - start, c] < min_cos:
                    break
                key = frozenset((prompts[r], prompts[c]))
                if key not in seen:
                    seen.add(key)
                    out_a.append(prompts[r])
                    out_b.append(prompts[c])
    return pd.DataFrame({"prompt_a": out_a, "prompt_b": out_b,
                         "label": np.full(len(out_a), float(label), dtype=np.float64)})
