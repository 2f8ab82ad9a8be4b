"""Huffman code lengths (Huffman 1952) — the last stage of Deep Compression (Han, Mao & Dally,
ICLR 2016, arXiv 1510.00149 §4), which Huffman-codes the cluster indices of the shared weights.
Only the *lengths* are needed for a size report: Σ_s count(s)·len(s) bits.

The tree is built with ``heapq``: repeatedly merge the two least frequent nodes; each merge adds
one bit to every symbol under it. Ties are broken by insertion order (a counter), so the result
is deterministic. Symbols with count 0 get no code (length 0); a single used symbol gets a 1-bit
code (a decoder still needs one bit per index).
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence


def huffman_code_lengths(counts: Sequence[int]) -> list[int]:
    """Code length of every symbol (index into ``counts``); 0 for unused symbols."""
    lengths = [0] * len(counts)
    heap = [(c, i, [i]) for i, c in enumerate(counts) if c > 0]
    if len(heap) == 1:
        lengths[heap[0][2][0]] = 1
        return lengths
    heapq.heapify(heap)
    order = len(counts)
    while len(heap) > 1:
        ca, _, a = heapq.heappop(heap)
        cb, _, b = heapq.heappop(heap)
        for s in a + b:
            lengths[s] += 1
        heapq.heappush(heap, (ca + cb, order, a + b))
        order += 1
    return lengths


def huffman_bits(counts: Sequence[int]) -> int:
    """Total bits of the Huffman-coded sequence with these symbol counts (no code table)."""
    return sum(c * n for c, n in zip(counts, huffman_code_lengths(counts)))
