"""Tests for attention.lstmn against a float64 NumPy reference of the paper."""

import inspect

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attention.lstmn import (DeepFusionLSTMN, DeepFusionLSTMNCell, LSTMN, LSTMNCell,
                             ShallowFusionLSTMN, ShallowFusionLSTMNCell)
from attention.masks import masked_softmax

B, T, IN, F, A, S, D = 3, 6, 3, 4, 5, 5, 6
# Row 1 has trailing padding, row 2 an interior gap as well.
MASK = np.array([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0], [1, 0, 1, 1, 1, 0]], bool)
ENC_MASK = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0]], bool)
PLAIN_KEYS = ("W_h", "W_x", "W_htilde", "v", "W_gates_htilde", "W_gates_x")
# Shared instances so the per-model jit cache in `run` is reused across tests.
CELLS = {"plain": LSTMNCell(F, attention_dim=A),
         "shallow": ShallowFusionLSTMNCell(F, attention_dim=A),
         "deep": DeepFusionLSTMNCell(F, attention_dim=A)}


def _rand(seed, shape, scale=1.0):
    # NumPy RNG: eager jax.random would compile once per shape.
    return jnp.asarray(scale * np.random.default_rng(seed).normal(size=shape), jnp.float32)


X = _rand(0, (B, T, IN))
ENC_H = _rand(1, (B, S, D))
ENC_C = _rand(2, (B, S, F))


def _randomize(params, seed, scale=0.6):
    """Replaces every leaf (biases too) so no term is trivially zero."""
    leaves, tree = jax.tree_util.tree_flatten(params)
    return jax.tree_util.tree_unflatten(
        tree, [_rand(seed * 100 + k, l.shape, scale) for k, l in enumerate(leaves)])


def _init(module, *args, seed=7, **kw):
    # Every leaf is replaced anyway, so only shapes are needed; skipping the real
    # initializers saves compiling them.
    shapes = jax.eval_shape(lambda *a: module.init(jax.random.PRNGKey(seed), *a, **kw), *args)
    return {"params": _randomize(shapes["params"], seed)}


_JITTED = {}


def run(model, variables, *args, **kw):
    """``model.apply`` through a per-model jit cache (flags static) to keep tests fast."""
    if id(model) not in _JITTED:
        _JITTED[id(model)] = (model, jax.jit(model.apply, static_argnames=(
            "return_weights", "return_memory", "method")))
    return _JITTED[id(model)][1](variables, *args, **kw)


def _np(tree):
    return jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), tree)


def _sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def _softmax(a):
    e = np.exp(a - a.max())
    return e / e.sum()


def _dense(p, x):
    return x @ p["kernel"] + p.get("bias", 0.0)


def reference(params, x, mask, mode="plain", enc_h=None, enc_c=None, enc_mask=None):
    """Loop-over-t float64 LSTMN (Section 3.1) with optional fusion (Section 4).

    Padded steps are skipped entirely; their outputs are zeros.
    """
    p = _np(params["cell"])
    x = np.asarray(x, np.float64)
    batch, steps, _ = x.shape
    feats = p["W_gates_htilde"]["kernel"].shape[0]
    hidden, memory = np.zeros((batch, steps, feats)), np.zeros((batch, steps, feats))
    intra = np.zeros((batch, steps, steps))
    inter = None if enc_h is None else np.zeros((batch, steps, enc_h.shape[1]))
    for b in range(batch):
        tape = []  # (position, h, c)
        h_tilde = np.zeros(feats)
        gamma_tilde = None if enc_h is None else np.zeros(enc_h.shape[-1])
        for t in range(steps):
            if not mask[b, t]:
                continue
            x_t = x[b, t]
            c_tilde = np.zeros(feats)
            if tape:
                q = _dense(p["W_x"], x_t) + _dense(p["W_htilde"], h_tilde)
                a = np.array([_dense(p["v"], np.tanh(_dense(p["W_h"], h) + q))[0]
                              for _, h, _ in tape])
                s = _softmax(a)
                h_tilde = sum(w * h for w, (_, h, _) in zip(s, tape))
                c_tilde = sum(w * c for w, (_, _, c) in zip(s, tape))
                for w, (pos, _, _) in zip(s, tape):
                    intra[b, t, pos] = w
            else:
                h_tilde = np.zeros(feats)
            z = _dense(p["W_gates_htilde"], h_tilde) + _dense(p["W_gates_x"], x_t)
            extra_c = 0.0
            if mode != "plain":
                valid_j = np.flatnonzero(enc_mask[b])
                gam = np.asarray(enc_h[b], np.float64)
                q = _dense(p["W_x_inter"], x_t) + _dense(p["W_gammatilde"], gamma_tilde)
                al = np.array([_dense(p["u"], np.tanh(_dense(p["W_gamma"], gam[j]) + q))[0]
                               for j in valid_j])
                pw = _softmax(al)
                inter[b, t, valid_j] = pw
                gamma_tilde = pw @ gam[valid_j]
                if mode == "shallow":
                    z = z + _dense(p["W_gates_ctx"], gamma_tilde)
                else:
                    alpha_tilde = pw @ np.asarray(enc_c[b], np.float64)[valid_j]
                    r = _sigmoid(_dense(p["W_r"], np.concatenate([gamma_tilde, x_t])))
                    extra_c = r * alpha_tilde
            i, f, o, g = np.split(z, 4)
            c = _sigmoid(f) * c_tilde + _sigmoid(i) * np.tanh(g) + extra_c
            h = _sigmoid(o) * np.tanh(c)
            tape.append((t, h, c))
            hidden[b, t], memory[b, t] = h, c
    return hidden, memory, intra, inter


@pytest.fixture(scope="module")
def lstmn():
    model = LSTMN(F, attention_dim=A)
    return model, _init(model, X, mask=MASK)


@pytest.fixture(scope="module")
def shallow():
    model = ShallowFusionLSTMN(F, attention_dim=A)
    return model, _init(model, X, ENC_H, mask=MASK, enc_mask=ENC_MASK, seed=8)


@pytest.fixture(scope="module")
def deep():
    model = DeepFusionLSTMN(F, attention_dim=A)
    return model, _init(model, X, ENC_H, ENC_C, mask=MASK, enc_mask=ENC_MASK, seed=9)


def test_param_names(lstmn, shallow, deep):
    assert set(lstmn[1]["params"]["cell"]) == set(PLAIN_KEYS)
    inter = {"W_gamma", "W_x_inter", "W_gammatilde", "u"}
    assert set(shallow[1]["params"]["cell"]) == set(PLAIN_KEYS) | inter | {"W_gates_ctx"}
    assert set(deep[1]["params"]["cell"]) == set(PLAIN_KEYS) | inter | {"W_r"}


def test_lstmn_matches_reference(lstmn):
    model, variables = lstmn
    hidden, memory, weights = run(model, variables, X, mask=MASK, return_memory=True,
                                  return_weights=True)
    assert hidden.shape == memory.shape == (B, T, F) and weights.shape == (B, T, T)
    assert weights.dtype == jnp.float32
    ref_h, ref_c, ref_w, _ = reference(variables["params"], X, MASK)
    np.testing.assert_allclose(hidden, ref_h, atol=1e-5)
    np.testing.assert_allclose(memory, ref_c, atol=1e-5)
    np.testing.assert_allclose(weights, ref_w, atol=1e-5)
    assert run(model, variables, X, mask=MASK).shape == (B, T, F)


def test_padding_never_attended_and_matches_truncated(lstmn):
    model, variables = lstmn
    hidden, weights = run(model, variables, X, mask=MASK, return_weights=True)
    pad = ~MASK
    assert np.all(np.asarray(weights)[np.broadcast_to(pad[:, None, :], weights.shape)] == 0)
    assert np.all(np.asarray(weights)[pad] == 0) and np.all(np.asarray(hidden)[pad] == 0)
    # Valid rows sum to one except the first valid step, which has no keys.
    sums = np.asarray(weights).sum(-1)
    first = MASK & (np.cumsum(MASK, axis=1) == 1)
    np.testing.assert_allclose(sums[MASK & ~first], 1.0, atol=1e-6)
    for b in (1, 2):  # trailing padding; interior gap
        idx = np.flatnonzero(MASK[b])
        h_b, w_b = run(model, variables, X[b:b + 1, idx], return_weights=True)
        np.testing.assert_allclose(hidden[b, idx], h_b[0], atol=1e-6)
        np.testing.assert_allclose(weights[b][np.ix_(idx, idx)], w_b[0], atol=1e-6)


def test_first_step_zero_weights_finite_grads_and_remat(lstmn):
    model, variables = lstmn
    mask = MASK.copy()
    mask[2] = False  # a fully padded example must not poison gradients
    _, weights = run(model, variables, X, mask=mask, return_weights=True)
    assert np.all(np.asarray(weights)[:, 0] == 0)
    assert np.all(np.triu(np.asarray(weights)) == 0)  # only strictly earlier steps

    def loss(m):
        fn = lambda p, x: jnp.sum(m.apply({"params": p}, x, mask=mask) ** 2)
        return jax.jit(jax.value_and_grad(fn, argnums=(0, 1)))

    value, (g_params, g_x) = loss(model)(variables["params"], X)
    for leaf in jax.tree_util.tree_leaves(g_params):
        assert np.all(np.isfinite(leaf)) and np.any(leaf != 0)
    assert np.all(np.isfinite(g_x)) and np.all(np.asarray(g_x)[~mask] == 0)
    # nn.remat recomputes the forward pass but gives the same value and gradients.
    # (jax.checkpoint traces keyword flags, so only the default outputs are used.)
    got = loss(nn.remat(LSTMN)(F, attention_dim=A))(variables["params"], X)
    for a, b in zip(jax.tree_util.tree_leaves((value, g_params, g_x)),
                    jax.tree_util.tree_leaves(got)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_masked_softmax_empty_rows_and_dtype():
    scores = jnp.array([[1.0, 2.0, 3.0], [1e4, -1e4, 0.0]], jnp.bfloat16)
    mask = jnp.array([[False, False, False], [True, False, True]])
    w = jax.jit(masked_softmax)(scores, mask)
    assert w.dtype == jnp.float32
    np.testing.assert_array_equal(w[0], 0.0)
    np.testing.assert_allclose(w[1], [1.0, 0.0, 0.0], atol=1e-6)
    g = jax.jit(jax.grad(lambda s: jnp.sum(masked_softmax(s, mask) * jnp.arange(3.0))))(
        scores.astype(jnp.float32))
    assert np.all(np.isfinite(g)) and np.all(np.asarray(g)[~np.asarray(mask)] == 0)


@pytest.mark.parametrize("mode", ["shallow", "deep"])
def test_fusion_matches_reference(mode, shallow, deep):
    model, variables = shallow if mode == "shallow" else deep
    enc = (ENC_H,) if mode == "shallow" else (ENC_H, ENC_C)
    hidden, (intra, inter) = run(model, variables, X, *enc, mask=MASK, enc_mask=ENC_MASK,
                                 return_weights=True)
    assert inter.shape == (B, T, S) and intra.shape == (B, T, T)
    ref_h, _, ref_intra, ref_inter = reference(variables["params"], X, MASK, mode,
                                               np.asarray(ENC_H), np.asarray(ENC_C), ENC_MASK)
    np.testing.assert_allclose(hidden, ref_h, atol=1e-5)
    np.testing.assert_allclose(intra, ref_intra, atol=1e-5)
    np.testing.assert_allclose(inter, ref_inter, atol=1e-5)
    assert np.all(np.asarray(inter)[np.broadcast_to(~ENC_MASK[:, None], inter.shape)] == 0)


def test_deep_reads_encoder_memory_shallow_cannot(shallow, deep):
    model, variables = deep
    base = run(model, variables, X, ENC_H, ENC_C, mask=MASK, enc_mask=ENC_MASK)
    bumped = run(model, variables, X, ENC_H, ENC_C + 1.0, mask=MASK, enc_mask=ENC_MASK)
    assert np.max(np.abs(np.asarray(bumped - base))[MASK]) > 1e-3
    # Padded source slots of the memory tape stay invisible.
    pad_only = ENC_C + 100.0 * jnp.asarray(~ENC_MASK)[..., None]
    np.testing.assert_array_equal(
        run(model, variables, X, ENC_H, pad_only, mask=MASK, enc_mask=ENC_MASK), base)
    # Even non-finite ones: an outside encoder need not zero its padding.
    nan_pad = jnp.where(jnp.asarray(ENC_MASK)[..., None], ENC_H, jnp.nan)
    np.testing.assert_array_equal(
        run(model, variables, X, nan_pad, jnp.where(jnp.asarray(ENC_MASK)[..., None], ENC_C,
                                                    jnp.inf), mask=MASK, enc_mask=ENC_MASK),
        base)
    # Shallow fusion has no path for the encoder memory at all.
    for fn in (ShallowFusionLSTMN.__call__, ShallowFusionLSTMNCell.prepare_encoder):
        assert "enc_memory" not in inspect.signature(fn).parameters
    assert "W_r" not in shallow[1]["params"]["cell"]
    with pytest.raises(ValueError):
        DeepFusionLSTMN(F).init(jax.random.PRNGKey(0), X, ENC_H, ENC_H[..., :F - 1])


def _plain_from(variables):
    return {"params": {"cell": {k: variables["params"]["cell"][k] for k in PLAIN_KEYS}}}


def _with(variables, name, **leaves):
    params = jax.tree_util.tree_map(lambda a: a, variables["params"])
    params["cell"] = dict(params["cell"])
    params["cell"][name] = {k: v(params["cell"][name][k]) for k, v in leaves.items()}
    return {"params": params}


def test_deep_gate_reduces_to_lstmn(lstmn, deep):
    model, variables = deep
    plain_h, plain_w = run(lstmn[0], _plain_from(variables), X, mask=MASK, return_weights=True)
    fwd = lambda v, c: run(model, v, X, ENC_H, c, mask=MASK, enc_mask=ENC_MASK,
                           return_weights=True)
    # r_t = 0: the encoder memory is shut out, leaving exactly the plain LSTMN.
    closed = _with(variables, "W_r", kernel=jnp.zeros_like, bias=lambda b: jnp.full_like(b, -1e4))
    for enc_c in (ENC_C, 5.0 * ENC_C):
        h, (intra, _) = fwd(closed, enc_c)
        np.testing.assert_allclose(h, plain_h, atol=1e-6)
        np.testing.assert_allclose(intra, plain_w, atol=1e-6)
    # r_t = 1 with a zero memory tape adds nothing either.
    opened = _with(variables, "W_r", kernel=jnp.zeros_like, bias=lambda b: jnp.full_like(b, 1e4))
    np.testing.assert_allclose(fwd(opened, jnp.zeros_like(ENC_C))[0], plain_h, atol=1e-6)
    # r_t = 1: c_1 differs from the plain cell's by exactly alpha~_1 = sum_j p_j alpha_j.
    cell = CELLS["deep"]
    carry = cell.initialize_carry(None, B, T, D)
    cell_vars = {"params": opened["params"]["cell"]}
    enc = run(cell, cell_vars, ENC_H, ENC_C, enc_mask=ENC_MASK, method="prepare_encoder")
    new, (_, _, p1) = run(cell, cell_vars, carry, X[:, 0], enc, valid=MASK[:, 0])
    plain_new, _ = run(CELLS["plain"], {"params": _plain_from(variables)["params"]["cell"]},
                       carry.lstmn, X[:, 0], valid=MASK[:, 0])
    np.testing.assert_allclose(new.lstmn.c_tape[:, 0] - plain_new.c_tape[:, 0],
                               jnp.einsum("bs,bsf->bf", p1, ENC_C), atol=1e-5)


def test_shallow_without_context_is_lstmn(lstmn, shallow):
    model, variables = shallow
    cut = _with(variables, "W_gates_ctx", kernel=jnp.zeros_like)
    h, (intra, _) = run(model, cut, X, 3.0 * ENC_H, mask=MASK, enc_mask=ENC_MASK,
                        return_weights=True)
    plain_h, plain_w = run(lstmn[0], _plain_from(variables), X, mask=MASK, return_weights=True)
    np.testing.assert_allclose(h, plain_h, atol=1e-6)
    np.testing.assert_allclose(intra, plain_w, atol=1e-6)
    full = run(model, variables, X, ENC_H, mask=MASK, enc_mask=ENC_MASK)
    assert np.max(np.abs(np.asarray(full - plain_h))) > 1e-3


@pytest.mark.parametrize("mode", ["plain", "shallow", "deep"])
def test_cell_stepping_matches_layer(mode, lstmn, shallow, deep):
    """Driving the cell by hand (as a greedy decoder would) equals the scan."""
    model, variables = {"plain": lstmn, "shallow": shallow, "deep": deep}[mode]
    cell, cell_vars = CELLS[mode], {"params": variables["params"]["cell"]}
    if mode == "plain":
        want = run(model, variables, X, mask=MASK)
        carry, extra = cell.initialize_carry(None, B, T), ()
    else:
        enc_args = (ENC_H,) if mode == "shallow" else (ENC_H, ENC_C)
        want = run(model, variables, X, *enc_args, mask=MASK, enc_mask=ENC_MASK)
        carry = cell.initialize_carry(None, B, T, D)
        extra = (run(cell, cell_vars, *enc_args, enc_mask=ENC_MASK, method="prepare_encoder"),)
    step = lambda c, x, v: run(cell, cell_vars, c, x, *extra, valid=v)
    for t in range(T):
        carry, outs = step(carry, X[:, t], MASK[:, t])
        np.testing.assert_allclose(outs[0], want[:, t], atol=1e-6)


def test_steps_past_max_len_leave_the_tape_alone(lstmn):
    """A cell run past its tape's ``max_len`` still computes but writes nothing."""
    _, variables = lstmn
    cell, cell_vars = CELLS["plain"], {"params": variables["params"]["cell"]}
    valid = jnp.ones((B,), bool)
    carry = cell.initialize_carry(None, B, 2)
    for t in range(2):
        carry, _ = run(cell, cell_vars, carry, X[:, t], valid=valid)
    full = carry
    carry, (h, weights) = run(cell, cell_vars, full, X[:, 2], valid=valid)
    for name in ("h_tape", "c_tape", "h_tape_proj", "tape_mask"):
        np.testing.assert_array_equal(getattr(carry, name), getattr(full, name))
    assert np.all(np.asarray(full.tape_mask)) and int(carry.step) == 3
    np.testing.assert_allclose(np.asarray(weights).sum(-1), 1.0, atol=1e-6)
    assert np.all(np.isfinite(np.asarray(h)))


def test_transforms(lstmn, deep):
    model, variables = lstmn
    eager = model.apply(variables, X, mask=MASK, return_weights=True)
    jitted = run(model, variables, X, mask=MASK, return_weights=True)
    for a, b in zip(eager, jitted):
        np.testing.assert_allclose(a, b, atol=1e-6)
    # vmap over an extra leading axis of independent batches.
    xs = jnp.stack([X, 2.0 * X])
    vm = jax.vmap(lambda x: run(model, variables, x, mask=MASK))(xs)
    np.testing.assert_allclose(vm[1], run(model, variables, 2.0 * X, mask=MASK), atol=1e-6)
    # Deep fusion: every parameter and both encoder tapes receive finite gradients.
    dmodel, dvars = deep

    def dloss(params, enc_h, enc_c):
        h, (intra, inter) = dmodel.apply({"params": params}, X, enc_h, enc_c, mask=MASK,
                                         enc_mask=ENC_MASK, return_weights=True)
        return jnp.sum(h ** 2) + jnp.sum(intra ** 2) + jnp.sum(inter ** 2)

    grads = jax.jit(jax.grad(dloss, argnums=(0, 1, 2)))(dvars["params"], ENC_H, ENC_C)
    for leaf in jax.tree_util.tree_leaves(grads):
        assert np.all(np.isfinite(leaf)) and np.any(leaf != 0)
    assert np.all(np.asarray(grads[2])[~ENC_MASK] == 0)


def test_bfloat16_compute():
    model = LSTMN(F, attention_dim=A, dtype=jnp.bfloat16)
    variables = _init(model, X, mask=MASK)
    hidden, memory, weights = run(model, variables, X.astype(jnp.bfloat16), mask=MASK,
                                  return_memory=True, return_weights=True)
    assert hidden.dtype == memory.dtype == jnp.bfloat16 and weights.dtype == jnp.float32
    ref_h, _, ref_w, _ = reference(variables["params"], X, MASK)
    np.testing.assert_allclose(np.asarray(hidden, np.float32), ref_h, atol=5e-2)
    np.testing.assert_allclose(weights, ref_w, atol=5e-2)
    assert np.all(np.isfinite(np.asarray(hidden, np.float32)))
