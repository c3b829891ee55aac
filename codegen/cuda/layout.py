"""The packed weight layout of the CUDA backend, in numpy: pack, and unpack for checking.

Layout ``cuda_mma_b16`` (applied by the ``reorder-weights`` pass, printed in the IR):

- Codes are first biased to unsigned (``u = code - min(code type)``) so that one conversion
  serves signed and unsigned weights; the zero point moves by the same amount (``z' = z - min``).
- Each code sits in a container of ``cb`` bits (4 or 8). 2- and 3-bit codes use 4-bit
  containers (exact, but they move 4 bits per weight).
- ``[K, N]`` is padded to multiples of 64 (zero codes, zero scales) and cut into k16 x n64
  warp tiles. One warp reads a tile with one (cb=4) or two (cb=8) 16-byte loads per lane,
  and each lane then holds exactly the B fragments of eight ``mma.m16n8k16`` (n8 tiles
  ``t*2+h``, t = n16 tile, h = n8 half): lane ``4g + q`` holds columns ``n = 16t + 8h + g``
  and rows ``k = 2q + {0, 1}`` (fragment b0 b1) and ``k = 2q + 8 + {0, 1}`` (b2 b3).
- Stored as uint32 words ``[K/16, N/64, cb/4, 32 lanes, 4 words]``: word ``w`` of 16-byte
  chunk ``j`` of a lane is unit ``u = 4j + w``; it covers n16 tile ``t = u // (cb/4)``.
- cb=4, nibble interleave for the magic-number conversion: nibble ``i`` of the word holds
  (k odd = i>>2, n8 half h = (i>>1)&1, k+8 = i&1). ``(w & 0x000f000f) | 0x64006400`` is then
  the fp16 pair (b0, b1) of n8 tile h=0, ``(w & 0x00f000f0) | ...`` the pair (b2, b3), and the
  same on ``w >> 8`` gives tile h=1; for bf16 the pairs are ``(w >> 4i) & 0x000f000f``.
- cb=8: word ``v = u % 2`` of tile t is n8 half h=v, bytes (k, k+1, k+8, k+9): a PRMT with
  0x64 builds the fp16 pairs (b0, b1) and (b2, b3).

Scales and zero points per K group (``[G, N]``) are permuted so that one 16-byte load gives a
lane the 8 values of its columns: ``[G, N/64, 8 (g), 8 (slot 2t + h)]``. Per-channel scales
(applied in the epilogue) stay in column order.
"""
from __future__ import annotations

import numpy as np

K_ALIGN = 64   # K is padded to the k-tile of the kernel's pipeline
N_ALIGN = 64   # N is padded to the warp's n64 tile
LAYOUT_NAME = "cuda_mma_b16"


def pad_to(x: int, m: int) -> int:
    return -(-x // m) * m


def _split_kn(u: np.ndarray) -> np.ndarray:
    """[Kp, Np] → [ks, k8, q, kodd, nb, t, h, g] with k = 16ks + 8k8 + 2q + kodd,
    n = 64nb + 16t + 8h + g."""
    kp, np_ = u.shape
    return u.reshape(kp // 16, 2, 4, 2, np_ // 64, 4, 2, 8)


def pack_codes(u: np.ndarray, cb: int) -> np.ndarray:
    """Unsigned codes ``u [Kp, Np]`` (Kp % 16 == 0, Np % 64 == 0, values < 2^cb) → uint32
    words ``[Kp/16, Np/64, cb/4, 32, 4]``."""
    u = np.asarray(u)
    kp, np_ = u.shape
    if kp % 16 or np_ % 64:
        raise ValueError(f"pack_codes needs K % 16 == 0 and N % 64 == 0, got {u.shape}")
    if u.size and int(u.max()) >= (1 << cb):
        raise ValueError(f"codes exceed {cb}-bit containers")
    s = _split_kn(u.astype(np.uint32))
    # axes of s: 0 ks, 1 k8, 2 q, 3 kodd, 4 nb, 5 t, 6 h, 7 g
    if cb == 4:
        # → [ks, nb, g, q, t, kodd, h, k8]; lane = 4g + q, word = t, nibble = 4kodd + 2h + k8
        v = s.transpose(0, 4, 7, 2, 5, 3, 6, 1).reshape(kp // 16, np_ // 64, 32, 4, 8)
        shifts = (4 * np.arange(8, dtype=np.uint32))
        words = (v << shifts).sum(axis=-1, dtype=np.uint64).astype(np.uint32)
        return words.reshape(kp // 16, np_ // 64, 1, 32, 4)
    if cb == 8:
        # t = 2tj + tw; → [ks, nb, tj, g, q, tw, h, k8, kodd]; chunk = tj, word = 2tw + h,
        # byte = 2k8 + kodd
        s = s.reshape(kp // 16, 2, 4, 2, np_ // 64, 2, 2, 2, 8)
        # axes: 0 ks, 1 k8, 2 q, 3 kodd, 4 nb, 5 tj, 6 tw, 7 h, 8 g
        v = s.transpose(0, 4, 5, 8, 2, 6, 7, 1, 3).reshape(kp // 16, np_ // 64, 2, 32, 4, 4)
        shifts = (8 * np.arange(4, dtype=np.uint32))
        words = (v << shifts).sum(axis=-1, dtype=np.uint64).astype(np.uint32)
        return words
    raise ValueError(f"container bits must be 4 or 8, not {cb}")


def unpack_codes(words: np.ndarray, cb: int) -> np.ndarray:
    """The inverse of ``pack_codes``: uint32 words → unsigned codes ``[Kp, Np]``."""
    words = np.asarray(words, dtype=np.uint32)
    ks, nb = words.shape[0], words.shape[1]
    kp, np_ = ks * 16, nb * 64
    if cb == 4:
        w = words.reshape(ks, nb, 32, 4)
        v = (w[..., None] >> (4 * np.arange(8, dtype=np.uint32))) & 0xF
        v = v.reshape(ks, nb, 8, 4, 4, 2, 2, 2)  # [ks, nb, g, q, t, kodd, h, k8]
        s = v.transpose(0, 7, 3, 5, 1, 4, 6, 2)  # → [ks, k8, q, kodd, nb, t, h, g]
        return s.reshape(kp, np_).astype(np.uint8)
    if cb == 8:
        w = words.reshape(ks, nb, 2, 32, 4)
        v = (w[..., None] >> (8 * np.arange(4, dtype=np.uint32))) & 0xFF
        v = v.reshape(ks, nb, 2, 8, 4, 2, 2, 2, 2)  # [ks, nb, tj, g, q, tw, h, k8, kodd]
        s = v.transpose(0, 7, 4, 8, 1, 2, 5, 6, 3)  # → [ks, k8, q, kodd, nb, tj, tw, h, g]
        return s.reshape(kp, np_).astype(np.uint8)
    raise ValueError(f"container bits must be 4 or 8, not {cb}")


def permute_group_rows(rows: np.ndarray) -> np.ndarray:
    """Per-group values ``[G, Np]`` → ``[G, Np/64, 8 (g), 8 (2t + h)]`` (flattened to [G, Np])."""
    g, np_ = rows.shape
    s = rows.reshape(g, np_ // 64, 4, 2, 8)          # [G, nb, t, h, g]
    return np.ascontiguousarray(s.transpose(0, 1, 4, 2, 3)).reshape(g, np_)


def unpermute_group_rows(rows: np.ndarray) -> np.ndarray:
    g, np_ = rows.shape
    s = rows.reshape(g, np_ // 64, 8, 4, 2)          # [G, nb, g, t, h]
    return np.ascontiguousarray(s.transpose(0, 1, 3, 4, 2)).reshape(g, np_)


def act_order_permutation(g_idx: np.ndarray, block: int) -> np.ndarray:
    """The K permutation that makes act-order groups contiguous: row ``k'`` of the reordered
    weight is row ``perm[k']`` of the original and belongs to group ``k' // block``.

    Every group must have exactly ``block`` rows (GPTQ's desc_act does); otherwise the groups
    cannot be made contiguous blocks and the caller refuses the weight."""
    g_idx = np.asarray(g_idx).reshape(-1).astype(np.int64)
    perm = np.argsort(g_idx, kind="stable")
    counts = np.bincount(g_idx)
    k = g_idx.shape[0]
    full = counts[:-1] if k % block else counts
    if np.any(full != block) or (k % block and counts[-1] != k % block):
        raise ValueError(f"act-order groups must hold exactly {block} rows each "
                         f"(sizes seen: {sorted(set(counts.tolist()))})")
    return perm.astype(np.int32)
