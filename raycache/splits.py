"""Question-disjoint splits: connected components of a pair graph, assigned whole to one part.

Two pairs that share a prompt (directly or through a chain of pairs) land in the same part, so a
model validated or tested on one part has never seen any of its prompts in training. Used by
``raycache train`` (its automatic validation split), by the recipe benchmark and by experiments
that split a stream by group.
"""

from __future__ import annotations

from typing import Hashable, Iterator, Sequence

import numpy as np


class UnionFind:
    """Disjoint sets of hashable items (path halving); an item joins on first use. Iterating gives the
    items in the order they were first seen; ``union(a, b)`` hangs ``a``'s root under ``b``'s."""

    def __init__(self) -> None:
        self.parent: dict[Hashable, Hashable] = {}

    def find(self, x: Hashable) -> Hashable:
        parent = self.parent
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    def union(self, a: Hashable, b: Hashable) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[ra] = rb

    def __iter__(self) -> Iterator[Hashable]:
        return iter(list(self.parent))


def pair_components(prompts_a: Sequence[str], prompts_b: Sequence[str]) -> np.ndarray:
    """Component id [n] of each pair (row) of the graph whose nodes are prompts and edges pairs.

    Ids are dense ints 0..k-1 in order of first appearance; equal ids = connected pairs.
    """
    if len(prompts_a) != len(prompts_b):
        raise ValueError(f"got {len(prompts_a)} prompts_a but {len(prompts_b)} prompts_b")
    sets = UnionFind()
    edges = []
    for a, b in zip(prompts_a, prompts_b):
        edges.append(str(a))
        sets.union(str(a), str(b))
    dense: dict[Hashable, int] = {}
    return np.fromiter((dense.setdefault(sets.find(a), len(dense)) for a in edges), dtype=np.int64,
                       count=len(edges))


def assign_components(components: np.ndarray, fractions: Sequence[float], seed: int = 0) -> np.ndarray:
    """Part index [n] per row: whole components shuffled (seeded) and dealt out so that part k holds
    about ``fractions[k]`` of the rows (fractions are normalised to sum 1)."""
    fractions = np.asarray(fractions, dtype=np.float64)
    if fractions.ndim != 1 or len(fractions) < 2 or np.any(fractions < 0) or fractions.sum() <= 0:
        raise ValueError(f"fractions must be >= 2 non-negative numbers, got {list(fractions)}")
    components = np.asarray(components)
    ids, sizes = np.unique(components, return_counts=True)
    order = np.random.default_rng(seed).permutation(len(ids))
    bounds = np.cumsum(fractions / fractions.sum()) * len(components)
    part_of_component = np.empty(len(ids), dtype=np.int64)
    filled, part = 0, 0
    for j in order:
        while part < len(bounds) - 1 and filled >= bounds[part]:
            part += 1
        part_of_component[j] = part
        filled += sizes[j]
    lookup = dict(zip(ids.tolist(), part_of_component.tolist()))
    return np.fromiter((lookup[c] for c in components.tolist()), dtype=np.int64, count=len(components))


def split_pairs(prompts_a: Sequence[str], prompts_b: Sequence[str], holdout: float,
                seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(train_rows, holdout_rows): row indices of a question-disjoint split, ~``holdout`` of rows held out.

    Raises ValueError when the pair graph is one component (nothing can be held out disjointly).
    """
    if not 0.0 < holdout < 1.0:
        raise ValueError(f"holdout must be in (0, 1), got {holdout}")
    comps = pair_components(prompts_a, prompts_b)
    if len(np.unique(comps)) < 2:
        raise ValueError("all pairs are connected through shared prompts: no question-disjoint "
                         "split exists (pass separate validation pairs)")
    part = assign_components(comps, [1.0 - holdout, holdout], seed)
    return np.flatnonzero(part == 0), np.flatnonzero(part == 1)


def prompt_groups(prompts_a: Sequence[str], prompts_b: Sequence[str],
                  labels: Sequence[float]) -> tuple[list[str], np.ndarray]:
    """(prompts, group [m]): every distinct prompt of the pairs, and its answer group.

    Groups are the connected components of the positive pairs (label ≥ 0.5): two prompts share a
    group when a chain of "same answer" pairs links them; a prompt with no positive pair is alone.
    """
    prompts = list(dict.fromkeys([str(p) for p in prompts_a] + [str(p) for p in prompts_b]))
    positive = np.asarray(labels, dtype=np.float64) >= 0.5
    # every prompt as a self-pair, then the positive pairs: one graph, one component per group
    a = prompts + [str(p) for p, keep in zip(prompts_a, positive) if keep]
    b = prompts + [str(p) for p, keep in zip(prompts_b, positive) if keep]
    return prompts, pair_components(a, b)[: len(prompts)]
