"""Independent float64 numpy references: direct loops over pixels, no einsum."""

import itertools

import numpy as np


def loop_content(q, k, v, normalize_queries):
  """softmax over all pixels per key channel, then Q (K^T V), pixel by pixel."""
  b, h, w, n, d = q.shape
  out = np.zeros(v.shape[:-1] + (v.shape[-1],))
  for bi, ni in itertools.product(range(b), range(n)):
    keys = k[bi, :, :, ni].reshape(h * w, d)
    keys = np.exp(keys - keys.max(axis=0))
    keys /= keys.sum(axis=0)
    vals = v[bi, :, :, ni].reshape(h * w, -1)
    for x, y in itertools.product(range(h), range(w)):
      query = q[bi, x, y, ni]
      if normalize_queries:
        query = np.exp(query - query.max())
        query /= query.sum()
      # sum over pixels j and channels c: q_c * softmaxed_k[j, c] * v[j]
      total = np.zeros(vals.shape[-1])
      for j in range(h * w):
        total += sum(query[c] * keys[j, c] for c in range(d)) * vals[j]
      out[bi, x, y, ni] = total
  return out


def loop_positional(q, v, rel, axis, softmax=False):
  """out[x,y] = sum over x' within (L-1)/2 of (q[x,y] . rel[x'-x+c]) v[x',y] (or along y)."""
  b, h, w, n, _ = q.shape
  num_rel = rel.shape[0]
  c = (num_rel - 1) // 2
  out = np.zeros(v.shape)
  for bi, x, y, ni in itertools.product(range(b), range(h), range(w), range(n)):
    size = h if axis == 1 else w
    pos = x if axis == 1 else y
    keys = [p for p in range(size) if abs(p - pos) <= c]
    weights = np.array([q[bi, x, y, ni] @ rel[p - pos + c, ni] for p in keys])
    if softmax:
      weights = np.exp(weights - weights.max())
      weights /= weights.sum()
    for wt, p in zip(weights, keys, strict=True):
      out[bi, x, y, ni] += wt * (v[bi, p, y, ni] if axis == 1 else v[bi, x, p, ni])
  return out
