"""Float64 numpy references shared by the tests (independent of the code under test)."""

import numpy as np


def attention_forward(q, k, v, mask=None, bias=None, causal=False, scale=None,
                      keep=None, keep_scale=1.0):
  """Returns (out [..., T, H, Dv], probs [..., H, T, S]) in float64.

  q: [..., T, H, D]; k, v: [..., S, Hkv, D]; mask/bias/keep broadcastable to
  [..., H, T, S]. Fully masked rows give zero probabilities. ``keep``:
  attention dropout's pattern, applied (times ``keep_scale``) to the
  probabilities before they weight v; ``probs`` are those before dropout.
  """
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  groups = q.shape[-2] // k.shape[-2]
  k = np.repeat(k, groups, axis=-2)
  v = np.repeat(v, groups, axis=-2)
  scale = 1.0 / np.sqrt(q.shape[-1]) if scale is None else scale
  s = np.einsum("...qhd,...khd->...hqk", q, k) * scale
  if bias is not None:
    s = s + np.asarray(bias, np.float64)
  allowed = np.ones(s.shape, bool)
  if mask is not None:
    allowed = allowed & np.asarray(mask, bool)
  if causal:
    t, n = s.shape[-2:]
    allowed = allowed & (np.arange(n)[None, :] <= np.arange(t)[:, None])
  s = np.where(allowed, s, -np.inf)
  m = np.max(s, axis=-1, keepdims=True)
  m = np.where(np.isfinite(m), m, 0.0)
  e = np.exp(s - m) * allowed
  den = e.sum(-1, keepdims=True)
  p = e / np.where(den > 0, den, 1.0)
  pd = p if keep is None else p * np.asarray(keep, bool) * keep_scale
  return np.einsum("...hqk,...khd->...qhd", pd, v), p


def attention_backward(q, k, v, dout, mask=None, causal=False, scale=None,
                       keep=None, keep_scale=1.0):
  """Analytic float64 gradients (dq, dk, dv) of <out, dout> for MHA without GQA.

  With ``keep`` (dropout): out = (P * Z) v, Z = keep * keep_scale, so
  dv = (P * Z)^T dout and the softmax sees dP = (dout v^T) * Z.
  """
  q, k, v, dout = (np.asarray(x, np.float64) for x in (q, k, v, dout))
  scale = 1.0 / np.sqrt(q.shape[-1]) if scale is None else scale
  _, p = attention_forward(q, k, v, mask, None, causal, scale)
  z = 1.0 if keep is None else np.asarray(keep, bool) * keep_scale
  do = np.swapaxes(dout, -2, -3)          # [..., H, T, D]
  vh = np.swapaxes(v, -2, -3)
  kh = np.swapaxes(k, -2, -3)
  qh = np.swapaxes(q, -2, -3)
  dv = np.einsum("...hqk,...hqd->...hkd", p * z, do)
  dp = np.einsum("...hqd,...hkd->...hqk", do, vh) * z
  ds = p * (dp - np.sum(dp * p, axis=-1, keepdims=True))
  dq = np.einsum("...hqk,...hkd->...hqd", ds, kh) * scale
  dk = np.einsum("...hqk,...hqd->...hkd", ds, qh) * scale
  back = lambda x: np.swapaxes(x, -2, -3)
  return back(dq), back(dk), back(dv)
