"""A small neural-network observable (MLP on jet and lepton features), trained in place.

The observable replaces HT in a region (``observable: nn``). It is a correction learnt on top of
HT, so training starts from the AGC analysis rather than from noise::

    nn(event) = sigmoid((HT - HT_CENTER) / HT_SCALE + w3 . tanh(W2 tanh(W1 f + b1) + b2) + b3)

with ``f`` the :data:`FEATURES` of the event, each scaled to O(1), and ``w3 = 0, b3 = 0`` at
initialisation (so the network starts as a monotone function of HT). Its output lies in (0, 1).

The features are functions of the selected objects, so the same formula serves both modes:
the soft analysis feeds it the expected values under the soft selection (exactly the hard
values in the hard limit), the conventional hard analysis (:mod:`jacana.stages.reference`) the hard ones.
:func:`mlp` is written for numpy and jax alike.

Weights live in the parameters under ``"nn"`` (a dict of arrays) and in the analysis config
under ``nn.weights`` (nested lists), so ``jacana evaluate --params params.json`` reproduces the
trained observable.

>>> import numpy as np
>>> w = init_weights((16, 16), seed=0)
>>> f = np.zeros((3, len(FEATURES))); f[:, 0] = [230.0, 330.0, 430.0]   # HT in GeV (physical units)
>>> np.round(mlp(w, f, np), 3).tolist()       # = sigmoid((HT - 330) / 100) at initialisation
[0.269, 0.5, 0.731]
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

#: Per-event inputs of the network, in this order, and the scale each is divided by.
FEATURES = ("ht", "jet1_pt", "jet2_pt", "jet3_pt", "jet4_pt", "n_jets", "lepton_pt", "m_bjj")
FEATURE_SCALES = np.array([500.0, 100.0, 100.0, 100.0, 100.0, 8.0, 100.0, 500.0])
HT_CENTER, HT_SCALE = 330.0, 100.0  # GeV: the HT skip connection
#: Bandwidth of the relaxed histogram per GeV of the analysis' bandwidth: the NN output spans
#: (0, 1) where HT's histogram spans 440 GeV.
BANDWIDTH_PER_GEV = 1.0 / 440.0
WEIGHT_NAMES = ("w1", "b1", "w2", "b2", "w3", "b3")
DEFAULT_HIDDEN = (16, 16)


def init_weights(hidden: Sequence[int] = DEFAULT_HIDDEN, seed: int = 0) -> dict[str, np.ndarray]:
    """Glorot-scaled hidden layers (seeded) and a zero output layer: the network starts as HT."""
    if len(hidden) != 2 or min(hidden) < 1:
        raise ValueError(f"nn.hidden must be two positive layer sizes, got {list(hidden)}")
    rng = np.random.default_rng(seed)
    n0, n1, n2 = len(FEATURES), int(hidden[0]), int(hidden[1])
    return {
        "w1": rng.normal(0.0, np.sqrt(2.0 / (n0 + n1)), (n0, n1)), "b1": np.zeros(n1),
        "w2": rng.normal(0.0, np.sqrt(2.0 / (n1 + n2)), (n1, n2)), "b2": np.zeros(n2),
        "w3": np.zeros(n2), "b3": np.zeros(()),
    }


def mlp(weights: Mapping, features, xp=np):
    """The observable for features ``[..., len(FEATURES)]`` in physical units -> ``[...]`` in (0, 1)."""
    x = features / xp.asarray(FEATURE_SCALES, dtype=features.dtype)
    h = xp.tanh(x @ weights["w1"] + weights["b1"])
    h = xp.tanh(h @ weights["w2"] + weights["b2"])
    ht = features[..., 0]
    z = (ht - HT_CENTER) / HT_SCALE + h @ weights["w3"] + weights["b3"]
    return 1.0 / (1.0 + xp.exp(-z))


def stack_features(values: Mapping, xp=np):
    """``{feature name: [...]}`` -> ``[..., len(FEATURES)]`` in :data:`FEATURES` order."""
    missing = [f for f in FEATURES if f not in values]
    if missing:
        raise KeyError(f"nn features missing: {missing}")
    return xp.stack([xp.asarray(values[f]) for f in FEATURES], axis=-1)


def weights_from_config(nn: Mapping | None) -> dict[str, np.ndarray]:
    """The network of an analysis config's ``nn`` section (trained weights, or the seeded init)."""
    nn = dict(nn or {})
    hidden = tuple(nn.get("hidden", DEFAULT_HIDDEN))
    if nn.get("weights") is None:
        return init_weights(hidden, int(nn.get("seed", 0)))
    w = {k: np.asarray(nn["weights"][k], dtype=np.float64) for k in WEIGHT_NAMES}
    expected = init_weights(hidden, 0)
    bad = [k for k in WEIGHT_NAMES if w[k].shape != expected[k].shape]
    if bad:
        raise ValueError(f"nn.weights: shapes of {bad} do not match nn.hidden={list(hidden)} and"
                         f" {len(FEATURES)} features ({[expected[k].shape for k in bad]} expected)")
    return w


def weights_to_json(weights: Mapping) -> dict:
    """Nested lists (JSON) of a weights dict (numpy or jax arrays)."""
    return {k: np.asarray(weights[k], dtype=np.float64).tolist() for k in WEIGHT_NAMES}
