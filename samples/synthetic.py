"""Synthetic AGC-like NanoAOD samples: a small, vectorised, physics-motivated event generator.

``generate(out_dir, events, seed, preset="agc")`` writes NanoAOD-like ROOT files (TTree ``Events``)
for the samples of a preset (``PRESETS``): "agc", the nine (process, variation) pairs of the AGC ttbar
analysis, or "single_top", those of a single-top t-channel measurement (t-channel signal, ttbar and
its scale variations, W+jets, tW); a ``fileset.json`` in the shape of the AGC's
``nanoaod_inputs.json`` and a sidecar ``generator.json`` with the generator's metadata (and preset).
Why: the default run and the tests need AGC-shaped events on any machine, with nothing to
download; a toy with realistic shapes and correlations for the AGC selection serves.
The model is fixed by physics and is NOT tuned to make any analysis or optimisation look better.

The output is a deterministic function of ``(seed, events, files_per_sample, preset)``: every chunk
of at most ``CHUNK_EVENTS`` events draws from its own ``numpy.random.SeedSequence([seed, process,
variation, file, chunk])`` (the single_top preset's and the MET's streams add a ``spawn_key``, so
the "agc" preset's pre-MET branches are what generator 1.1.0 wrote before MET existed), so the files'
branch contents are bit-identical for the same arguments. W+jets is generated ``oversample`` times
its share and skimmed (``skims`` of the preset; the AGC's: ``OVERSAMPLE``, ``SKIMS``);
``skim_conflicts`` names every cut a config can loosen beyond the skim.

The model in full (sample split, event content, weights, parton-level physics, ttbar variations,
detector model, MET, presets, known limitations) and its measured cost: ``docs/samples.md``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
from collections.abc import Callable, Mapping

import numpy as np

from jacana.stages.columns import per_event_count

GENERATOR_VERSION = "1.1.0"

# ---------------------------------------------------------------------------------------------
# samples
SAMPLES: tuple[tuple[str, str, float], ...] = (
    ("ttbar", "nominal", 0.30),
    ("ttbar", "scaledown", 0.06),
    ("ttbar", "scaleup", 0.06),
    ("ttbar", "ME_var", 0.06),
    ("ttbar", "PS_var", 0.06),
    ("single_top_s_chan", "nominal", 0.03),
    ("single_top_t_chan", "nominal", 0.08),
    ("single_top_tW", "nominal", 0.05),
    ("wjets", "nominal", 0.30),
)
SAMPLE_FRACTIONS = {(p, v): f for p, v, f in SAMPLES}
#: The "single_top" preset's samples (t-channel measurement): signal and W+jets (its dominant
#: background at 2-3 jets, oversampled) get the most; ttbar (the background at 3 jets and >= 2 b-tags)
#: with its scale variations, and tW. The first sample takes the remainder of the integer split.
SINGLE_TOP_SAMPLES: tuple[tuple[str, str, float], ...] = (
    ("single_top_t_chan", "nominal", 0.25),
    ("ttbar", "nominal", 0.20),
    ("ttbar", "scaledown", 0.05),
    ("ttbar", "scaleup", 0.05),
    ("single_top_tW", "nominal", 0.10),
    ("wjets", "nominal", 0.35),
)
PROCESS_INDEX = {"ttbar": 0, "single_top_s_chan": 1, "single_top_t_chan": 2, "single_top_tW": 3, "wjets": 4}
VARIATION_INDEX = {"nominal": 0, "scaledown": 1, "scaleup": 2, "ME_var": 3, "PS_var": 4}

NEG_WEIGHT_FRACTION = {"ttbar": 0.015, "single_top_s_chan": 0.13, "single_top_t_chan": 0.0,
                       "single_top_tW": 0.0, "wjets": 0.13}
# magnitudes are arbitrary (analyses use only the sign); ttbar's is the real file's value
GENWEIGHT_MAGNITUDE = {"ttbar": 225892.45, "single_top_s_chan": 3.294, "single_top_t_chan": 1.0,
                       "single_top_tW": 1.0, "wjets": 225892.45}


@dataclasses.dataclass(frozen=True)
class Skim:
    """A production skim: which generated events are written (the others cannot be selected).

    An event is kept when it has at least ``min_jets`` stored jets (pT >= 15 GeV) with
    ``|eta| < jet_eta_max`` and ``jetId == jet_id``, and at least ``min_leptons`` electrons or muons
    with ``pT >= lepton_pt_min`` inside the tracker (``|eta| < electron_eta_max`` / ``muon_eta_max``).
    Lossless for every analysis that needs that much: the AGC selection with ``lepton_pt_min >= 25``,
    ``jet_eta_max <= 2.4``, tight jets and at least four of them, whatever its jet-pT cut and
    whichever jet-pT variation (a jet the analysis could select is stored, pT >= 15 GeV).
    """

    min_jets: int = 4
    jet_eta_max: float = 2.4
    jet_id: int = 6
    min_leptons: int = 1
    lepton_pt_min: float = 25.0
    electron_eta_max: float = 2.5  # the tracker
    muon_eta_max: float = 2.4

    def keep(self, jets, electrons, muons) -> np.ndarray:
        """Per event: passes the skim (arguments are ``(counts, fields)`` as ``_detector`` returns them)."""
        (jc, j), (ec, e), (mc, m) = jets, electrons, muons
        n_jets = per_event_count(jc, (np.abs(j["eta"]) < self.jet_eta_max) & (j["jetId"] == self.jet_id))
        n_lep = (per_event_count(ec, (e["pt"] >= self.lepton_pt_min) & (np.abs(e["eta"]) < self.electron_eta_max))
                 + per_event_count(mc, (m["pt"] >= self.lepton_pt_min) & (np.abs(m["eta"]) < self.muon_eta_max)))
        return (n_jets >= self.min_jets) & (n_lep >= self.min_leptons)


#: W+jets is generated ``OVERSAMPLE`` times its share of ``events`` and skimmed (``SKIMS``): in the
#: AGC regions (>= 4 jets) inclusive W+jets is a few MC events of very large weight (one event was
#: ~170 expected events in 4j2b at 1M events), which made every hard-cut landscape a step function
#: of a handful of events. Skimmed, its files hold about as many events as before (~4 % pass) and
#: each weighs 1/OVERSAMPLE as much; the weight's denominator ``nevts_total`` counts the generated
#: events, as for any skimmed or filtered production.
OVERSAMPLE = {"wjets": 20}
SKIMS = {"wjets": Skim()}

EVENTS_PER_FILE = 50_000
MIN_FILES, MAX_FILES = 2, 6
CHUNK_EVENTS = 100_000

#: MET: the neutrinos' summed transverse momentum plus a Gaussian resolution term of this many GeV
#: per component (x and y), drawn from a stream of its own (docs/samples.md: why 15 GeV).
MET_SIGMA = 15.0


@dataclasses.dataclass(frozen=True)
class Tune:
    rad_rate: float = 1.0      # x Poisson mean of radiation jets
    rad_index: float = 1.0     # x Pareto index of radiation pT (> 1: softer)
    top_excess: float = 1.0    # x scale of the pair-mass excess (top pT)
    jet_response: float = 1.0  # x jet response
    jet_stoch: float = 0.9     # stochastic term of the jet resolution
    b_frag: float = 1.0        # x Beta 'a' of the b-jet b-tag distribution


TUNES = {
    "nominal": Tune(),
    "scaleup": Tune(rad_rate=1.1, rad_index=0.98),
    "scaledown": Tune(rad_rate=0.9, rad_index=1.02),
    "ME_var": Tune(top_excess=0.96),
    "PS_var": Tune(jet_response=0.985, jet_stoch=1.0, rad_index=1.02, b_frag=0.95),
}

# ---------------------------------------------------------------------------------------------
# constants
M_TOP, G_TOP = 172.5, 1.42
M_W, G_W = 80.38, 2.09
M_B, M_C = 4.8, 1.5
M_E, M_MU, M_TAU = 0.000511, 0.1057, 1.777

# origins of leptons
PROMPT, FROM_TAU, HEAVY_FLAVOUR, FAKE = 0, 1, 2, 3


# ---------------------------------------------------------------------------------------------
# four-vector helpers; a four-vector is a (4, n) float64 array (E, px, py, pz)
def _ptetaphim(p):
    e, px, py, pz = p
    pt = np.maximum(np.hypot(px, py), 1e-9)
    m2 = e * e - px * px - py * py - pz * pz
    return pt, np.arcsinh(pz / pt), np.arctan2(py, px), np.sqrt(np.maximum(m2, 0.0))


def _mass(p):
    return np.sqrt(np.maximum(p[0] ** 2 - p[1] ** 2 - p[2] ** 2 - p[3] ** 2, 0.0))


def _boost(p, beta):
    """Boost four-vectors ``p`` by velocity ``beta`` (3, n) (rest frame -> lab)."""
    bx, by, bz = beta
    b2 = np.minimum(bx * bx + by * by + bz * bz, 1 - 1e-15)
    gamma = 1.0 / np.sqrt(1.0 - b2)
    bp = bx * p[1] + by * p[2] + bz * p[3]
    g2 = np.where(b2 > 0, (gamma - 1.0) / np.where(b2 > 0, b2, 1.0), 0.0)
    k = g2 * bp + gamma * p[0]
    return np.stack([gamma * (p[0] + bp), p[1] + k * bx, p[2] + k * by, p[3] + k * bz])


def _beta(p):
    return p[1:] / p[0]


def _two_body(rng, M, m1, m2, cos=None):
    """Decay masses M -> m1 m2 in the rest frame; isotropic unless ``cos`` (of daughter 1) is given."""
    n = len(M)
    pstar = np.sqrt(np.maximum((M * M - (m1 + m2) ** 2) * (M * M - (m1 - m2) ** 2), 0.0)) / (2 * M)
    c = rng.uniform(-1.0, 1.0, n) if cos is None else cos
    s = np.sqrt(np.maximum(1.0 - c * c, 0.0))
    phi = rng.uniform(-np.pi, np.pi, n)
    px, py, pz = pstar * s * np.cos(phi), pstar * s * np.sin(phi), pstar * c
    e1 = np.sqrt(pstar ** 2 + m1 ** 2)
    e2 = np.sqrt(pstar ** 2 + m2 ** 2)
    return np.stack([e1, px, py, pz]), np.stack([e2, -px, -py, -pz])


def _breit_wigner(rng, m0, width, lo, hi, n):
    lo_c = np.arctan(2 * (lo - m0) / width)
    hi_c = np.arctan(2 * (hi - m0) / width)
    return m0 + 0.5 * width * np.tan(rng.uniform(lo_c, hi_c, n))


def _system(rng, M, ptx, pty, y_sigma):
    """Velocity of a system of mass M with transverse momentum (ptx, pty) and rapidity ~ N(0, y_sigma)."""
    y = rng.normal(0.0, y_sigma, len(M))
    mt = np.sqrt(M * M + ptx * ptx + pty * pty)
    e = mt * np.cosh(y)
    return np.stack([ptx / e, pty / e, mt * np.sinh(y) / e])


def _round_mantissa(x, bits):
    """Keep ``bits`` bits of the float32 mantissa (round to nearest), like NanoAOD's stored precision."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    shift = np.uint32(23 - bits)
    i = x.view(np.uint32)
    i = ((i + np.uint32(1 << (23 - bits - 1))) >> shift) << shift
    return i.view(np.float32)


def _choice(rng, n, probs):
    """Vectorised categorical draw: index into ``probs`` for n draws."""
    return np.searchsorted(np.cumsum(probs)[:-1], rng.random(n), side="right").astype(np.int32)


# ---------------------------------------------------------------------------------------------
class _Event:
    """Accumulates parton-level jets and leptons (flat arrays with an event index) for n events."""

    def __init__(self, rng, n, tune):
        self.rng, self.n, self.tune = rng, n, tune
        self.partons = []   # (ev, pt, eta, phi, flav)
        self.leptons = []   # (ev, pt, eta, phi, pdg, charge, origin)
        self.invisible = []  # (ev, px, py): neutrinos (recorded without drawing a random number)

    def add_partons(self, ev, p4, flav):
        pt, eta, phi, _ = _ptetaphim(p4)
        self.partons.append((ev, pt, eta, phi, np.broadcast_to(np.asarray(flav, np.int32), ev.shape)))

    def add_partons_ptetaphi(self, ev, pt, eta, phi, flav):
        self.partons.append((ev, pt, eta, phi, np.broadcast_to(np.asarray(flav, np.int32), ev.shape)))

    def add_leptons(self, ev, pt, eta, phi, pdg, charge, origin):
        b = lambda a, t: np.broadcast_to(np.asarray(a, t), ev.shape)  # noqa: E731
        self.leptons.append((ev, pt, eta, phi, b(pdg, np.int32), b(charge, np.int32), b(origin, np.int32)))

    def add_invisible(self, ev, pt, phi):
        self.invisible.append((ev, pt * np.cos(phi), pt * np.sin(phi)))

    def invisible_pt(self):
        """Per event: the vector sum (px, py) of the neutrinos' transverse momenta."""
        ev = _cat(self.invisible, 0, np.int64)
        return (np.bincount(ev, _cat(self.invisible, 1), minlength=self.n),
                np.bincount(ev, _cat(self.invisible, 2), minlength=self.n))

    # -- physics building blocks ------------------------------------------------------------
    def radiation(self, ev_all, lam, index, pt0=12.0, eta_sigma=1.8):
        """Poisson(lam) radiation partons per event; returns the summed (px, py) per event."""
        rng = self.rng
        t = self.tune
        k = rng.poisson(lam * t.rad_rate, len(ev_all))
        ev = np.repeat(ev_all, k)
        m = len(ev)
        pt = np.minimum(pt0 * rng.random(m) ** (-1.0 / (index * t.rad_index)), 3000.0)
        eta = rng.normal(0.0, eta_sigma, m)
        phi = rng.uniform(-np.pi, np.pi, m)
        flav = np.array([5, 4, 0], np.int32)[_choice(rng, m, [0.02, 0.04, 0.94])]
        self.add_partons_ptetaphi(ev, pt, eta, phi, flav)
        sx = np.bincount(ev, pt * np.cos(phi), minlength=self.n)[ev_all]
        sy = np.bincount(ev, pt * np.sin(phi), minlength=self.n)[ev_all]
        return sx, sy

    def decay_w(self, ev, w4, charge, leptonic_only=False):
        rng = self.rng
        n = len(ev)
        if leptonic_only:
            mode = 2 + rng.integers(0, 3, n).astype(np.int32)
        else:
            mode = _choice(rng, n, [0.338, 0.338, 0.108, 0.108, 0.108])
        m1 = np.array([0.0, M_C, M_E, M_MU, M_TAU])[mode]
        p1, p2 = _two_body(rng, _mass(w4), m1, np.zeros(n))
        beta = _beta(w4)
        p1, p2 = _boost(p1, beta), _boost(p2, beta)
        had = mode < 2
        self.add_partons(ev[had], p1[:, had], np.where(mode[had] == 1, 4, 0))
        self.add_partons(ev[had], p2[:, had], 0)
        nu_pt, _, nu_phi, _ = _ptetaphim(p2[:, ~had])  # the W's neutrino
        self.add_invisible(ev[~had], nu_pt, nu_phi)
        lep = (mode == 2) | (mode == 3)
        pt, eta, phi, _ = _ptetaphim(p1[:, lep])
        self.add_leptons(ev[lep], pt, eta, phi, np.where(mode[lep] == 2, 11, 13), charge[lep], PROMPT)
        tau = mode == 4
        pt, eta, phi, _ = _ptetaphim(p1[:, tau])
        u = rng.random(len(pt))
        tl = u < 0.352
        x = rng.beta(2.0, 3.0, int(tl.sum()))
        self.add_leptons(ev[tau][tl], pt[tl] * x, eta[tl], phi[tl], np.where(u[tl] < 0.178, 11, 13),
                         charge[tau][tl], FROM_TAU)
        self.add_invisible(ev[tau][tl], pt[tl] * (1.0 - x), phi[tl])  # the tau's two neutrinos, collinear
        th = ~tl
        x = rng.beta(3.0, 2.0, int(th.sum()))
        self.add_partons_ptetaphi(ev[tau][th], pt[th] * x, eta[th], phi[th], 0)
        self.add_invisible(ev[tau][th], pt[th] * (1.0 - x), phi[th])  # the tau's neutrino, collinear

    def decay_top(self, ev, t4, charge):
        rng = self.rng
        n = len(ev)
        mw = _breit_wigner(rng, M_W, G_W, 60.0, 100.0, n)
        pb, pw = _two_body(rng, _mass(t4), np.full(n, M_B), mw)
        beta = _beta(t4)
        self.add_partons(ev, _boost(pb, beta), 5)
        self.decay_w(ev, _boost(pw, beta), charge)

    def pair(self, ev, m1, m2, shape, scale, y_sigma, recoil, cos=None):
        """A two-body system (masses m1, m2) with mass excess ~ Gamma, balancing ``recoil`` in pT."""
        rng = self.rng
        n = len(ev)
        M = m1 + m2 + rng.gamma(shape, scale * self.tune.top_excess, n)
        p1, p2 = _two_body(rng, M, m1, m2, cos)
        ptx = -recoil[0] + rng.normal(0.0, 5.0, n)
        pty = -recoil[1] + rng.normal(0.0, 5.0, n)
        beta = _system(rng, M, ptx, pty, y_sigma)
        return _boost(p1, beta), _boost(p2, beta)

    def top_mass(self, n):
        return _breit_wigner(self.rng, M_TOP, G_TOP, 150.0, 195.0, n)

    def top_charge(self, n):
        return np.where(self.rng.random(n) < 0.6, 1, -1).astype(np.int32)


# ---------------------------------------------------------------------------------------------
# processes
def _ttbar(e: _Event):
    ev = np.arange(e.n)
    rec = e.radiation(ev, 3.0, 2.0)
    t1, t2 = e.pair(ev, e.top_mass(e.n), e.top_mass(e.n), 1.4, 90.0, 0.9, rec)
    e.decay_top(ev, t1, np.ones(e.n, np.int32))
    e.decay_top(ev, t2, -np.ones(e.n, np.int32))


def _single_top_s(e: _Event):
    ev = np.arange(e.n)
    rec = e.radiation(ev, 1.5, 2.0)
    t, b = e.pair(ev, e.top_mass(e.n), np.full(e.n, M_B), 1.5, 60.0, 1.0, rec)
    e.decay_top(ev, t, e.top_charge(e.n))
    e.add_partons(ev, b, 5)


def _single_top_t(e: _Event):
    rng = e.rng
    ev = np.arange(e.n)
    rec = e.radiation(ev, 1.8, 2.0)
    u = rng.uniform(-1.0, 1.0, e.n)
    cos = np.sign(u) * np.abs(u) ** 0.4
    t, q = e.pair(ev, e.top_mass(e.n), np.zeros(e.n), 1.5, 90.0, 1.2, rec, cos=cos)
    e.decay_top(ev, t, e.top_charge(e.n))
    e.add_partons(ev, q, 0)
    # spectator b from the initial-state gluon splitting, mostly soft
    e.add_partons_ptetaphi(ev, 5.0 + rng.exponential(15.0, e.n), rng.normal(0.0, 2.0, e.n),
                           rng.uniform(-np.pi, np.pi, e.n), 5)


def _single_top_t_forward(e: _Event):
    """t-channel with a realistically forward spectator quark (the "single_top" preset's signal).

    ``_single_top_t`` (kept as it is for the "agc" preset) decays a (t, q) pair with cos(theta*)
    pushed to +-1 in its frame, which still leaves the light quark with mean |eta| ~ 1.4; in real
    t-channel events the quark that emitted the W keeps most of its (valence) momentum: |eta| ~ 2-3,
    pT ~ m_W / 2. Here its pT follows the W propagator, dN/dpT^2 ~ 1 / (pT^2 + (m_W/2)^2)^2 (median
    40 GeV), and its |eta| ~ |N(2.3, 0.9)| on either side; the top (rapidity ~ N(0, 1.1)) balances
    the quark and the radiation in pT, plus a N(0, 5 GeV) intrinsic kT.
    """
    rng = e.rng
    n = e.n
    ev = np.arange(n)
    rx, ry = e.radiation(ev, 1.8, 2.0)
    u = rng.random(n)
    qpt = np.minimum(0.5 * M_W * np.sqrt(u / (1.0 - u)), 1000.0)
    qeta = np.where(rng.random(n) < 0.5, 1.0, -1.0) * np.abs(rng.normal(2.3, 0.9, n))
    qphi = rng.uniform(-np.pi, np.pi, n)
    e.add_partons_ptetaphi(ev, qpt, qeta, qphi, 0)
    tpx = -(qpt * np.cos(qphi) + rx) + rng.normal(0.0, 5.0, n)
    tpy = -(qpt * np.sin(qphi) + ry) + rng.normal(0.0, 5.0, n)
    mt = np.sqrt(e.top_mass(n) ** 2 + tpx ** 2 + tpy ** 2)
    y = rng.normal(0.0, 1.1, n)
    e.decay_top(ev, np.stack([mt * np.cosh(y), tpx, tpy, mt * np.sinh(y)]), e.top_charge(n))
    # spectator b from the initial-state gluon splitting, mostly soft
    e.add_partons_ptetaphi(ev, 5.0 + rng.exponential(15.0, n), rng.normal(0.0, 2.0, n),
                           rng.uniform(-np.pi, np.pi, n), 5)


def _single_top_tw(e: _Event):
    ev = np.arange(e.n)
    rec = e.radiation(ev, 2.2, 2.0)
    mw = _breit_wigner(e.rng, M_W, G_W, 60.0, 100.0, e.n)
    t, w = e.pair(ev, e.top_mass(e.n), mw, 1.4, 70.0, 1.0, rec)
    q = e.top_charge(e.n)
    e.decay_top(ev, t, q)
    e.decay_w(ev, w, -q)


def _wjets(e: _Event):
    rng = e.rng
    ev_all = np.arange(e.n)
    k = rng.geometric(0.5, e.n) - 1      # P(k) = 0.5 * 0.5^k
    ev = np.repeat(ev_all, k)
    m = len(ev)
    pt = np.minimum(15.0 * rng.random(m) ** (-1.0 / 1.6), 3000.0)
    eta = rng.normal(0.0, 2.0, m)
    phi = rng.uniform(-np.pi, np.pi, m)
    flav = np.array([5, 4, 0], np.int32)[_choice(rng, m, [0.03, 0.10, 0.87])]
    e.add_partons_ptetaphi(ev, pt, eta, phi, flav)
    ptx = -np.bincount(ev, pt * np.cos(phi), minlength=e.n) + rng.normal(0.0, 6.0, e.n)
    pty = -np.bincount(ev, pt * np.sin(phi), minlength=e.n) + rng.normal(0.0, 6.0, e.n)
    mw = _breit_wigner(rng, M_W, G_W, 60.0, 100.0, e.n)
    beta = _system(rng, mw, ptx, pty, 1.8)
    w = _boost(np.stack([mw, np.zeros(e.n), np.zeros(e.n), np.zeros(e.n)]), beta)
    charge = np.where(rng.random(e.n) < 0.58, 1, -1).astype(np.int32)
    e.decay_w(ev_all, w, charge, leptonic_only=True)


PROCESSES = {"ttbar": _ttbar, "single_top_s_chan": _single_top_s, "single_top_t_chan": _single_top_t,
             "single_top_tW": _single_top_tw, "wjets": _wjets}


@dataclasses.dataclass(frozen=True)
class Preset:
    """A set of samples to generate: which (process, variation) pairs and their share of ``events``,
    which are oversampled and skimmed, and the process models used.

    ``stream`` is the ``spawn_key`` prefix of its random streams: ``index`` 0 ("agc") draws its
    events from the bare ``SeedSequence([seed, process, variation, file, chunk])`` (as generator
    1.1.0 always did), every other preset from a stream of its own, so no two presets share events.
    """

    name: str
    index: int
    samples: tuple[tuple[str, str, float], ...]
    oversample: Mapping[str, int]
    skims: Mapping[str, Skim]
    processes: Mapping[str, Callable[[_Event], None]]

    @property
    def fractions(self) -> dict[tuple[str, str], float]:
        return {(p, v): f for p, v, f in self.samples}


PRESETS: dict[str, Preset] = {
    "agc": Preset("agc", 0, SAMPLES, OVERSAMPLE, SKIMS, PROCESSES),
    #: 1-lepton, 2-3 jets, >= 1 b-tag with a forward jet: the W+jets skim keeps events with >= 2
    #: tight jets (stored, so pT >= 15 GeV; |eta| < 4.7) and a lepton above 25 GeV in the tracker
    #: (~30 % pass). Oversampled 10 times, a W+jets event weighs about as much as a ttbar event
    #: and the preset costs less time than the AGC's (docs/samples.md).
    "single_top": Preset("single_top", 1, SINGLE_TOP_SAMPLES, {"wjets": 10},
                         {"wjets": Skim(min_jets=2, jet_eta_max=4.7)},
                         {**PROCESSES, "single_top_t_chan": _single_top_t_forward}),
}


def _preset(preset: str | Preset) -> Preset:
    if isinstance(preset, Preset):
        return preset
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {preset!r}")
    return PRESETS[preset]


# ---------------------------------------------------------------------------------------------
# detector
def _cat(parts, i, dtype=None):
    arrs = [p[i] for p in parts]
    out = np.concatenate(arrs) if arrs else np.zeros(0)
    return out.astype(dtype) if dtype is not None else out


def _detector(e: _Event):
    """Turn the accumulated partons/leptons into sorted NanoAOD-like flat columns + counts."""
    rng, n, t = e.rng, e.n, e.tune

    # ---- partons -> jets
    ev = _cat(e.partons, 0, np.int64)
    ppt, peta, pphi = _cat(e.partons, 1), _cat(e.partons, 2), _cat(e.partons, 3)
    flav = _cat(e.partons, 4, np.int32)
    npart = len(ev)
    isb = flav == 5
    resp = np.where(isb, 0.95, 0.98) * t.jet_response
    sigma = np.sqrt(t.jet_stoch ** 2 / np.maximum(ppt, 1.0) + 0.05 ** 2)
    jpt = ppt * np.maximum(rng.normal(resp, sigma), 0.05)
    jeta = peta + rng.normal(0.0, 0.02, npart)
    jphi = pphi + rng.normal(0.0, 0.02, npart)
    jmass = jpt * np.where(isb, 0.15, 0.13) * np.exp(rng.normal(0.0, 0.35, npart))

    # ---- non-prompt leptons from heavy flavour and fakes from light jets (parton level)
    rnd = rng.random(npart)
    hf = ((flav == 5) & (rnd < 0.20)) | ((flav == 4) & (rnd < 0.10))
    fk = (flav == 0) & (rnd < 0.02)
    for sel, frac, origin in ((hf, (1.5, 5.0), HEAVY_FLAVOUR), (fk, (2.0, 4.0), FAKE)):
        k = int(sel.sum())
        x = rng.beta(*frac, k)
        e.add_leptons(ev[sel], ppt[sel] * x, peta[sel] + rng.normal(0, 0.08, k),
                      pphi[sel] + rng.normal(0, 0.08, k), np.where(rng.random(k) < 0.5, 11, 13),
                      np.where(rng.random(k) < 0.5, 1, -1), origin)

    # ---- leptons
    lev = _cat(e.leptons, 0, np.int64)
    lpt, leta, lphi = _cat(e.leptons, 1), _cat(e.leptons, 2), _cat(e.leptons, 3)
    pdg, charge, origin = (_cat(e.leptons, i, np.int32) for i in (4, 5, 6))
    nl = len(lev)
    is_e = pdg == 11
    prompt = origin <= FROM_TAU
    lpt = lpt * rng.normal(1.0, np.where(is_e, 0.02, 0.015), nl)
    leta = leta + rng.normal(0.0, 0.001, nl)
    lphi = lphi + rng.normal(0.0, 0.001, nl)
    keep = np.where(is_e, (lpt > 5) & (np.abs(leta) < 2.5), (lpt > 3) & (np.abs(leta) < 2.4))
    keep &= ~prompt | (rng.random(nl) < 0.95)
    chi3 = np.sqrt(rng.chisquare(3, nl))
    sip = np.select(
        [origin == PROMPT, origin == FROM_TAU, origin == HEAVY_FLAVOUR],
        [0.4 * chi3, 0.88 * chi3, 1.5 + rng.exponential(5.0, nl)],
        rng.exponential(3.0, nl))
    tail = prompt & (rng.random(nl) < 0.03)
    sip = np.where(tail, 2.0 + rng.exponential(4.0, nl), sip)
    iso = np.select(
        [prompt, origin == HEAVY_FLAVOUR],
        [np.where(rng.random(nl) < 0.35, 0.0, rng.exponential(0.05, nl)), 0.1 + rng.exponential(0.6, nl)],
        0.05 + rng.exponential(0.4, nl))
    tight_p = np.select([prompt, origin == HEAVY_FLAVOUR], [0.96, 0.85], 0.40)
    tight = rng.random(nl) < tight_p
    cut_p = np.select([prompt[:, None], (origin == HEAVY_FLAVOUR)[:, None]],
                      [np.array([[0.04, 0.03, 0.04, 0.09, 0.80]]), np.array([[0.45, 0.20, 0.15, 0.10, 0.10]])],
                      np.array([[0.60, 0.20, 0.10, 0.06, 0.04]]))
    cut = (rng.random(nl)[:, None] > np.cumsum(cut_p, axis=1)[:, :-1]).sum(axis=1).astype(np.int32)

    # ---- jets made of (prompt, isolated) leptons, as NanoAOD jets are not lepton-cleaned
    lj = keep & prompt & (lpt > 10) & (rng.random(nl) < np.where(is_e, 0.90, 0.85))
    k = int(lj.sum())
    ljpt = lpt[lj] * (1.0 + rng.exponential(0.06, k))
    lj_id = np.where(rng.random(k) < 0.95, 2, 6).astype(np.int32)

    # ---- pileup / underlying-event jets
    npu = rng.poisson(2.0, n)
    pev = np.repeat(np.arange(n), npu)
    m = len(pev)
    pupt = 15.0 + rng.exponential(5.0, m)
    pueta = rng.uniform(-4.7, 4.7, m)

    # ---- all jets
    J_ev = np.concatenate([ev, lev[lj], pev])
    J_pt = np.concatenate([jpt, ljpt, pupt])
    J_eta = np.concatenate([jeta, leta[lj] + rng.normal(0, 0.01, k), pueta])
    J_phi = np.concatenate([jphi, lphi[lj] + rng.normal(0, 0.01, k), rng.uniform(-np.pi, np.pi, m)])
    J_mass = np.concatenate([jmass, ljpt * 0.03, pupt * 0.2 * np.exp(rng.normal(0.0, 0.35, m))])
    J_flav = np.concatenate([flav, np.zeros(k, np.int32), np.zeros(m, np.int32)])
    nj = len(J_ev)
    J_phi = (J_phi + np.pi) % (2 * np.pi) - np.pi
    J_pt = _round_mantissa(J_pt, 10)
    J_eta = _round_mantissa(J_eta, 12)
    J_phi = _round_mantissa(J_phi, 12)
    J_mass = _round_mantissa(J_mass, 10)
    aeta = np.abs(J_eta)
    rj = rng.random(nj)
    J_id = np.where(rj < np.where(aeta > 2.7, 0.12, 0.04), 0, np.where(rj > 0.98, 2, 6)).astype(np.int32)
    J_id[npart:npart + k] = lj_id
    p_missing = np.select([J_id == 0, J_id == 2, J_flav > 0], [0.85, 0.45, 0.10], 0.18)
    missing = (aeta > 2.4) | (rng.random(nj) < p_missing)
    nb, nc = int((J_flav == 5).sum()), int((J_flav == 4).sum())
    btag = rng.beta(1.0, 3.5, nj)
    btag[J_flav == 5] = rng.beta(3.0 * t.b_frag, 0.8, nb)
    btag[J_flav == 4] = rng.beta(1.3, 2.0, nc)
    btag = np.where(missing, -10.0, _round_mantissa(btag, 10))
    jkeep = (J_pt >= 15.0) & (aeta < 4.7)

    jets = dict(pt=J_pt, eta=J_eta, phi=J_phi, mass=J_mass, btagCSVV2=btag, jetId=J_id, hadronFlavour=J_flav)
    jets = _sorted_collection(J_ev, J_pt, jkeep, jets, n)

    # ---- electrons, muons
    lphi = (lphi + np.pi) % (2 * np.pi) - np.pi
    lep_common = dict(pt=lpt.astype(np.float32), eta=_round_mantissa(leta, 12), phi=_round_mantissa(lphi, 12))
    sip = _round_mantissa(sip, 10)
    ele = dict(lep_common, mass=np.full(nl, M_E, np.float32), sip3d=sip, cutBased=cut, charge=charge)
    ele = _sorted_collection(lev, lpt, keep & is_e, ele, n)
    mu = dict(lep_common, mass=np.full(nl, M_MU, np.float32), sip3d=sip,
              pfRelIso04_all=_round_mantissa(iso, 10), tightId=tight, charge=charge)
    mu = _sorted_collection(lev, lpt, keep & ~is_e, mu, n)
    return jets, ele, mu


_DTYPES = {"pt": np.float32, "eta": np.float32, "phi": np.float32, "mass": np.float32,
           "btagCSVV2": np.float32, "sip3d": np.float32, "pfRelIso04_all": np.float32,
           "jetId": np.int32, "hadronFlavour": np.int32, "cutBased": np.int32, "charge": np.int32,
           "tightId": np.bool_}


def _sorted_collection(ev, pt, keep, fields, n):
    ev, pt = ev[keep], pt[keep]
    order = np.lexsort((-pt, ev))
    counts = np.bincount(ev, minlength=n)
    return counts, {k: np.asarray(v)[keep][order].astype(_DTYPES[k]) for k, v in fields.items()}


#: the second spawn_key word of a preset's streams (the "agc" preset's events have no spawn_key)
STREAM_EVENTS, STREAM_MET = 0, 1
_PI32 = np.nextafter(np.float32(np.pi), np.float32(0.0))  # the largest float32 <= pi


def _rng(seed, process, variation, file_index, chunk_index, spawn_key=()):
    ss = np.random.SeedSequence([seed, PROCESS_INDEX[process], VARIATION_INDEX[variation], file_index, chunk_index],
                                spawn_key=spawn_key)
    return np.random.Generator(np.random.PCG64(ss))


def _met(e: _Event, rng) -> tuple[np.ndarray, np.ndarray]:
    """(MET_pt, MET_phi) float32 per event: the neutrinos' pT sum + N(0, MET_SIGMA) per component."""
    px, py = e.invisible_pt()
    px = px + rng.normal(0.0, MET_SIGMA, e.n)
    py = py + rng.normal(0.0, MET_SIGMA, e.n)
    pt = _round_mantissa(np.hypot(px, py), 10)
    phi = np.clip(_round_mantissa(np.arctan2(py, px), 12), -_PI32, _PI32)
    return pt, phi


def _make_chunk(seed, process, variation, file_index, chunk_index, first_event, n, skim=True, preset="agc"):
    """Columns of the events of one chunk of n generated ones (a dict for uproot's TTree writer).

    With ``skim`` (and a skim for ``process`` in ``preset``), only the events that pass the preset's
    skim are returned; they are the very same events (same random stream) as without it.
    """
    import awkward as ak

    preset = _preset(preset)
    stream = (seed, process, variation, file_index, chunk_index)
    rng = _rng(*stream, () if preset.index == 0 else (preset.index, STREAM_EVENTS))
    e = _Event(rng, n, TUNES[variation])
    preset.processes[process](e)
    jets, ele, mu = _detector(e)
    event = np.arange(first_event, first_event + n, dtype=np.uint64)
    sign = np.where(rng.random(n) < NEG_WEIGHT_FRACTION[process], -1.0, 1.0)
    out = {
        "run": np.ones(n, np.uint32),
        "luminosityBlock": ((event - np.uint64(1)) // np.uint64(100) + np.uint64(1)).astype(np.uint32),
        "event": event,
        "genWeight": (sign * GENWEIGHT_MAGNITUDE[process]).astype(np.float32),
    }
    for name, (counts, cols) in (("Jet", jets), ("Electron", ele), ("Muon", mu)):
        out[name] = ak.zip({k: ak.unflatten(v, counts) for k, v in cols.items()})
    # after every draw of the event stream, from a stream of its own: the other branches do not move
    out["MET_pt"], out["MET_phi"] = _met(e, _rng(*stream, (preset.index, STREAM_MET)))
    if skim and process in preset.skims:
        keep = preset.skims[process].keep(jets, ele, mu)
        out = {k: v[keep] for k, v in out.items()}
    return out


# ---------------------------------------------------------------------------------------------
def _split(events, files_per_sample, preset="agc"):
    """(process, variation) -> list of per-file counts of generated events (before any skim)."""
    preset = _preset(preset)
    counts = {(p, v): int(math.floor(events * f)) for p, v, f in preset.samples}
    first = (preset.samples[0][0], preset.samples[0][1])  # "agc": ttbar nominal
    counts[first] += events - sum(counts.values())
    out = {}
    for key, n in counts.items():
        n = max(n, 1) * preset.oversample.get(key[0], 1)
        nf = files_per_sample or min(max(math.ceil(n / EVENTS_PER_FILE), MIN_FILES), MAX_FILES)
        nf = max(1, min(nf, n))
        base, rem = divmod(n, nf)
        out[key] = [base + (1 if i < rem else 0) for i in range(nf)]
    return out


def _write_file(path: pathlib.Path, seed, process, variation, file_index, first_event, n, preset="agc") -> int:
    """Generate n events into ``path`` (atomically); returns the number written (after the skim)."""
    import uproot

    tmp = path.with_name(path.name + ".tmp")
    written = 0
    try:
        with uproot.recreate(tmp) as f:
            tree = None
            for ci, start in enumerate(range(0, n, CHUNK_EVENTS)):
                m = min(CHUNK_EVENTS, n - start)
                data = _make_chunk(seed, process, variation, file_index, ci, first_event + start, m, preset=preset)
                if tree is None:
                    tree = f.mktree("Events", {k: (v.type if hasattr(v, "layout") else v.dtype)
                                               for k, v in data.items()}, title="Events")
                if len(data["event"]):
                    tree.extend(data)
                    written += len(data["event"])
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return written


def _write_json(path: pathlib.Path, obj):
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    os.replace(tmp, path)


def generate(out_dir, events: int = 1_000_000, seed: int = 1, files_per_sample: int | None = None,
             progress: bool = True, preset: str = "agc") -> pathlib.Path:
    """Write synthetic NanoAOD-like files, ``generator.json`` and ``fileset.json`` into ``out_dir``.

    ``preset`` names the sample set (``PRESETS``): "agc" (the AGC ttbar analysis' nine samples) or
    "single_top" (a t-channel measurement's). ``events`` is the total over its (process, variation)
    pairs (split by the preset's fractions, ``SAMPLE_FRACTIONS`` for "agc"; every pair gets at least
    one event). Returns the path of ``fileset.json``, which is written last.
    """
    from tqdm.auto import tqdm

    spec = _preset(preset)
    events = int(events)
    if events < len(spec.samples):
        raise ValueError(f"events must be at least {len(spec.samples)}, got {events}")
    if files_per_sample is not None and int(files_per_sample) < 1:
        raise ValueError(f"files_per_sample must be positive, got {files_per_sample}")
    seed = int(seed)
    if seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    split = _split(events, files_per_sample and int(files_per_sample), spec)
    fileset: dict = {}
    with tqdm(total=sum(len(v) for v in split.values()), unit="file", desc="jacana generate",
              disable=not progress) as bar:
        for (process, variation), per_file in split.items():
            files, first = [], 1
            for i, n in enumerate(per_file):
                name = f"{process}__{variation}__{i}.root"
                written = _write_file(out / name, seed, process, variation, i, first, n, spec)
                files.append({"path": name, "nevts": written})
                first += n
                bar.update(1)
            fileset.setdefault(process, {})[variation] = {"files": files, "nevts_total": sum(per_file)}
    _write_json(out / "generator.json", {
        "generator": "jacana.samples.synthetic",
        "version": GENERATOR_VERSION,
        "preset": spec.name,
        "seed": seed,
        "events": sum(f["nevts"] for vs in fileset.values() for b in vs.values() for f in b["files"]),
        "events_generated": sum(sum(v) for v in split.values()),
        "events_requested": events,
        "oversample": dict(spec.oversample),
        "skims": {p: dataclasses.asdict(k) for p, k in spec.skims.items()},
        "files_per_sample": files_per_sample,
        "sample_fractions": {f"{p}/{v}": f for p, v, f in spec.samples},
        "processes": {p: f.__name__ for p, f in spec.processes.items() if any(p == s[0] for s in spec.samples)},
        "met": {"branches": ["MET_pt", "MET_phi"], "resolution_per_component_gev": MET_SIGMA},
        "negative_weight_fraction": NEG_WEIGHT_FRACTION,
        "genWeight_magnitude": GENWEIGHT_MAGNITUDE,
        "tunes": {k: dataclasses.asdict(v) for k, v in TUNES.items()},
    })
    path = out / "fileset.json"
    _write_json(path, fileset)
    return path


def skim_conflicts(spec, fileset) -> list[str]:
    """Why skimmed samples of this generator behind ``fileset`` cannot serve ``spec`` in full.

    One line per cut that ``spec`` can loosen beyond a skim (a parameter's bounds or value, or a
    fixed cut): the events it would then select were never written. Empty when the fileset's
    folder has no ``generator.json`` of this generator (not synthetic, or generator 1.0).
    """
    entries = [files for variations in fileset.entries.values() for files, _ in variations.values() if files]
    if not entries or "://" in entries[0][0].path:
        return []
    meta_path = pathlib.Path(entries[0][0].path).parent / "generator.json"
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError):
        return []
    if meta.get("generator") != "jacana.samples.synthetic" or not meta.get("skims"):
        return []
    params, cuts = spec.parameters, spec.cuts
    out = []
    for process, skim in meta["skims"].items():
        # samples written before a limit was recorded in generator.json used the same value, then a literal
        skim = {**dataclasses.asdict(Skim()), **skim}
        where = f"{process} in {meta_path.parent} is skimmed ({meta_path.name})"
        if "lepton_pt_min" in params and params["lepton_pt_min"].lower < skim["lepton_pt_min"]:
            out.append(f"lepton_pt_min can go down to {params['lepton_pt_min'].lower:g} GeV, but {where} to leptons"
                       f" above {skim['lepton_pt_min']:g} GeV")
        if "jet_eta_max" in params and params["jet_eta_max"].upper > skim["jet_eta_max"]:
            out.append(f"jet_eta_max can go up to {params['jet_eta_max'].upper:g}, but {where} to jets within"
                       f" |eta| < {skim['jet_eta_max']:g}")
        if int(cuts.get("jet_id_value", skim["jet_id"])) != skim["jet_id"]:
            out.append(f"jet_id_value is {cuts['jet_id_value']}, but {where} to jets with jetId {skim['jet_id']}")
        if int(cuts.get("min_jets", skim["min_jets"])) < skim["min_jets"]:
            out.append(f"min_jets is {cuts['min_jets']}, but {where} to events with at least {skim['min_jets']}"
                       f" tight jets within |eta| < {skim['jet_eta_max']:g}")
        if int(cuts.get("n_leptons", skim["min_leptons"])) < skim["min_leptons"]:
            out.append(f"n_leptons is {cuts['n_leptons']}, but {where} to events with a lepton")
        if (float(cuts.get("electron_eta_max", 0)) > skim["electron_eta_max"]
                or float(cuts.get("muon_eta_max", 0)) > skim["muon_eta_max"]):
            out.append(f"the lepton |eta| cuts go beyond {skim['electron_eta_max']:g} (e) or"
                       f" {skim['muon_eta_max']:g} (mu), but {where} to leptons within those")
    return out
