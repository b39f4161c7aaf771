"""Question-disjoint splits: connected components of a pair graph, assigned whole to one part.

Two pairs that share a prompt (directly or through a chain of pairs) land in the same part, so a
model validated or tested on one part has never seen any of its prompts in training. Used by
``raycache train`` (its automatic validation split), by the recipe benchmark and by experiments
that split a stream by group.
"""

from __future__ import annotations

from collections import deque
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

    Whole connected components go to one side. When one component holds so many of the rows that
    no deal of whole components comes near ``holdout`` (mined k-nearest-neighbour pairs are usually
    one giant component), that component is cut instead (:func:`cut_component`): a breadth-first
    region of its prompts is held out, and the pairs crossing the cut are in neither part (so the
    two parts still share no prompt). Raises ValueError when no split with both parts non-empty
    exists.
    """
    if not 0.0 < holdout < 1.0:
        raise ValueError(f"holdout must be in (0, 1), got {holdout}")
    comps = pair_components(prompts_a, prompts_b)
    ids, sizes = np.unique(comps, return_counts=True)
    giant = int(ids[np.argmax(sizes)])
    if sizes.max() > (1.0 - holdout / 2) * len(comps):
        part = np.full(len(comps), -1, dtype=np.int64)
        rest = np.flatnonzero(comps != giant)
        if len(rest):
            part[rest] = assign_components(comps[rest], [1.0 - holdout, holdout], seed)
        rows = np.flatnonzero(comps == giant)
        want = max(holdout * len(comps) - float((part == 1).sum()), 1.0) / len(rows)
        held_prompts = cut_component([str(prompts_a[i]) for i in rows], [str(prompts_b[i]) for i in rows],
                                     min(want, 0.5), seed)
        inside = np.array([(str(prompts_a[i]) in held_prompts) + (str(prompts_b[i]) in held_prompts)
                           for i in rows], dtype=np.int64)
        part[rows[inside == 0]], part[rows[inside == 2]] = 0, 1
    else:
        part = assign_components(comps, [1.0 - holdout, holdout], seed)
    train, held = np.flatnonzero(part == 0), np.flatnonzero(part == 1)
    if not len(train) or not len(held):
        raise ValueError("all pairs are connected through shared prompts: no question-disjoint "
                         "split exists (pass separate validation pairs)")
    return train, held


def cut_component(prompts_a: Sequence[str], prompts_b: Sequence[str], holdout: float,
                  seed: int = 0) -> set[str]:
    """The prompts to hold out of one connected pair graph: grown breadth-first from a seeded random
    prompt until the pairs with both ends inside reach ``holdout`` of the rows. A breadth-first
    region of a neighbourhood graph keeps most of its pairs inside, so few pairs cross the cut."""
    neighbours: dict[str, list[str]] = {}
    for a, b in zip(prompts_a, prompts_b):
        neighbours.setdefault(a, []).append(b)
        neighbours.setdefault(b, []).append(a)
    nodes = list(neighbours)
    rng = np.random.default_rng(seed)
    want = holdout * len(prompts_a)
    held: set[str] = set()
    inside = 0
    queue = deque([nodes[int(rng.integers(len(nodes)))]])
    queued = set(queue)
    while queue and inside < want:
        node = queue.popleft()
        held.add(node)
        inside += sum(other in held for other in neighbours[node] if other != node) + neighbours[node].count(node) // 2
        fresh = list(dict.fromkeys(n for n in neighbours[node] if n not in queued))
        rng.shuffle(fresh)
        queue.extend(fresh)
        queued.update(fresh)
    return held


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
