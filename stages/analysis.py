"""The AGC ttbar analysis as one differentiable function of its parameters (soft mode).

:func:`soft_yields` maps (parameters, relaxation, one dense :class:`EventBatch`) to the relaxed
histograms of every region and every variation the batch carries::

    {region: {"sumw": [variations, bins], "sumw2": [variations, bins]}}

Per event, in blocks of events (``lax.scan``, so memory is bounded by the block size):

1. soft object selection (:mod:`.selection.soft`): lepton pT, jet pT, jet |eta| and b-tag cuts as weights;
2. soft event selection (:mod:`.selection.multiplicity`): P(exactly ``n_leptons`` leptons) x
   P(>= ``min_jets`` jets and exactly one / at least two b-tags), from exact Poisson-binomial DPs;
3. soft observables (:mod:`.observables.kinematics`): weighted HT, soft-argmax m_bjj;
4. relaxed histograms (:mod:`.histograms.relaxed`) filled with ``weight x P(selection)``; ``sumw2`` with
   ``weight^2 x P(selection)`` (the expectation of the hard ``sum w^2``); each block's
   histograms are added to float64 accumulators, whatever the batch dtype (float32 batches:
   mixed precision, float32 event arithmetic with float64 sums).

Variations: every kinematic variation of the batch (nominal, JES, JER: the jets are re-selected
with the varied pT) and, on nominal files, the b-tag weight variations
``w (1 +/- rate x pT_i / pt_ref)`` with ``pT_i`` the expected pT of the i-th selected jet (file
order). Normalisation systematics (W+jets, luminosity) are scale factors applied in the
statistical model; alternative samples (ME_var, PS_var, scaleup/down) are their own batches with
one variation. With every temperature and the bandwidth at zero (:func:`hard_relax`), every
histogram equals the conventional :func:`jacana.stages.reference.fill_histograms`.

Parameters travel as a dict of named scalars (:data:`PARAM_NAMES`), optionally with bin edges
``edges_<region>`` (kept ordered by sorting); ``relax`` holds one temperature per cut (same
names, same units), ``trijet_pt`` (the m_bjj softmax temperature, GeV) and ``bandwidth`` (the
histogram kernel width, in observable units). Both are traced: annealing does not recompile.
The static :class:`SoftConfig` (hashable) is what jit specialises on.
"""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jacana.stages.observables import nn
from jacana.stages.batch import EventBatch
from jacana.stages.keyed import KeyedBatch
from jacana.stages.shapes import ChunkBatches
from jacana.stages.histograms.relaxed import fill_variations
from jacana.stages.selection.multiplicity import jet_region_probs, nth_selected_value, prob_exactly
from jacana.stages.observables.kinematics import LOG_ZERO, soft_ht, soft_mbjj
from jacana.stages.observables.objects import exact_divide
from jacana.stages.selection.soft import log_soft_steps, soft_step
from jacana.stages.spec import NOMINAL, AnalysisSpec

jax.config.update("jax_enable_x64", True)

PARAM_NAMES = ("lepton_pt_min", "jet_pt_min", "jet_eta_max", "btag_min")
RELAX_NAMES = PARAM_NAMES + ("trijet_pt", "bandwidth")
#: Default m_bjj softmax temperature (GeV) and histogram bandwidth (GeV) at relaxation scale 1.
DEFAULT_TRIJET_PT_TEMPERATURE = 5.0
DEFAULT_BANDWIDTH = 10.0
#: dtype of the histogram accumulators and of the returned yields, whatever the batch dtype
#: (float32 batches: float32 event arithmetic, float64 sums over events).
ACCUMULATOR_DTYPE = jnp.float64


@dataclasses.dataclass(frozen=True)
class RegionDef:
    name: str
    observable: str  # "ht" | "m_bjj"
    btag: str  # "exactly_1" | "at_least_2"
    edges: tuple[float, ...]


@dataclasses.dataclass(frozen=True)
class BtagDef:
    n_jets: int
    rate: float
    pt_ref: float


@dataclasses.dataclass(frozen=True)
class SoftConfig:
    """The static (hashable) part of the analysis that the soft stages compile against."""

    n_leptons: int
    min_jets: int
    regions: tuple[RegionDef, ...]
    kinematic: tuple[str, ...]
    weight_variations: tuple[str, ...]
    btag: tuple[BtagDef, ...]
    kernel: str = "normal"
    flow: bool = False

    @property
    def uses_nn(self) -> bool:
        return any(r.observable == "nn" for r in self.regions)

    @property
    def parameters(self) -> tuple[str, ...]:
        return PARAM_NAMES

    @property
    def relax_names(self) -> tuple[str, ...]:
        return RELAX_NAMES

    def region(self, name: str) -> RegionDef:
        return next(r for r in self.regions if r.name == name)

    def variations(self, nominal_file: bool, kinematic: Sequence[str] | None = None) -> tuple[str, ...]:
        """Variation names along the ``variations`` axis of :func:`soft_yields`' output."""
        kin = tuple(kinematic) if kinematic is not None else (self.kinematic if nominal_file else (NOMINAL,))
        return kin + (self.weight_variations if nominal_file else ())


def soft_config(spec: AnalysisSpec, kernel: str = "normal", flow: bool = False):
    """The static soft-analysis configuration of ``spec``: a :class:`SoftConfig` for the AGC-specific
    config form, a :class:`~jacana.stages.definition.Definition` for the general one."""
    if spec.is_general:
        from jacana.stages.definition import build_definition

        return build_definition(spec.raw, kernel=kernel, flow=flow)
    c = spec.cuts
    regions = tuple(RegionDef(r.name, r.observable, r.btag, tuple(float(e) for e in r.edges))
                    for r in spec.regions.values())
    for r in regions:
        if r.observable not in ("ht", "m_bjj", "nn") or r.btag not in ("exactly_1", "at_least_2"):
            raise ValueError(f"region {r.name!r}: unsupported observable/btag {r.observable!r}/{r.btag!r}")
    btag = tuple(BtagDef(int(s.options["n_jets"]), float(s.options["rate"]), float(s.options["pt_ref"]))
                 for s in spec.systematics_of("btag_weight"))
    return SoftConfig(n_leptons=int(c["n_leptons"]), min_jets=int(c["min_jets"]), regions=regions,
                      kinematic=tuple(spec.kinematic_variations()),
                      weight_variations=tuple(spec.weight_variations()), btag=btag, kernel=kernel, flow=flow)


def param_names(spec: AnalysisSpec) -> tuple[str, ...]:
    """The tunable cut parameters the soft analysis of ``spec`` takes, in config order."""
    return tuple(spec.parameters) if spec.is_general else PARAM_NAMES


def relax_names(spec: AnalysisSpec) -> tuple[str, ...]:
    """The relaxation inputs: one temperature per cut parameter, the trijet-pT temperature, the bandwidth."""
    return param_names(spec) + ("trijet_pt", "bandwidth")


def default_params(spec: AnalysisSpec) -> dict:
    """The spec's parameter values as a dict of float64 scalars."""
    vals = spec.param_values()
    out = {k: jnp.asarray(float(vals[k]), jnp.float64) for k in param_names(spec)}
    if spec.uses_nn():
        out["nn"] = {k: jnp.asarray(v, jnp.float64) for k, v in spec.nn_weights().items()}
    return out


def default_relax(spec: AnalysisSpec, scale: float = 1.0, trijet_pt: float = DEFAULT_TRIJET_PT_TEMPERATURE,
                  bandwidth: float = DEFAULT_BANDWIDTH) -> dict:
    """Temperatures from the spec (times ``scale``), the trijet-pT temperature and the bandwidth."""
    out = {k: jnp.asarray(scale * spec.parameters[k].temperature, jnp.float64) for k in param_names(spec)}
    out["trijet_pt"] = jnp.asarray(scale * trijet_pt, jnp.float64)
    out["bandwidth"] = jnp.asarray(scale * bandwidth, jnp.float64)
    return out


def hard_relax(spec: AnalysisSpec | None = None) -> dict:
    """Every temperature and the bandwidth at zero: the exact hard analysis (of ``spec``; default: the AGC's names)."""
    return {k: jnp.asarray(0.0, jnp.float64) for k in (relax_names(spec) if spec is not None else RELAX_NAMES)}


def region_edges(params: Mapping, config: SoftConfig, dtype=jnp.float64) -> dict:
    """Bin edges per region: ``params["edges_<region>"]`` (sorted) when given, else the config's."""
    out = {}
    for r in config.regions:
        key = f"edges_{r.name}"
        if key in params:
            out[r.name] = jnp.sort(jnp.asarray(params[key], dtype))
        else:
            out[r.name] = jnp.asarray(np.asarray(r.edges), dtype)
    return out


def _bandwidth_unit(region: RegionDef) -> float:
    """The bandwidth is given in GeV; the NN observable lives in (0, 1)."""
    return nn.BANDWIDTH_PER_GEV if region.observable == "nn" else 1.0


def _block_yields(p, r, edges, nn_weights, b: EventBatch, config: SoftConfig):
    """Histogram contributions of one block of events: {region: (sumw [V, bins], sumw2 [V, bins])}."""
    p_lep = soft_step(b.lepton_pt, p["lepton_pt_min"], r["lepton_pt_min"]) * b.lepton_mask
    prob_lep = prob_exactly(p_lep, config.n_leptons)
    q_tag = soft_step(b.jet_btag, p["btag_min"], r["btag_min"])
    eta_w = soft_step(p["jet_eta_max"], jnp.abs(b.jet_eta), r["jet_eta_max"]) * b.jet_mask
    needed = {reg.observable for reg in config.regions}
    # float32: m_bjj's per-jet log weights from the logits, since the weights themselves underflow at
    # narrow temperatures where float64's still decide the choice (float64 keeps log(weight))
    narrow = jnp.finfo(b.dtype).bits < 64 and bool(needed & {"m_bjj", "nn"})
    if narrow:
        log_eta = log_soft_steps(p["jet_eta_max"], jnp.abs(b.jet_eta), r["jet_eta_max"], LOG_ZERO)[0]
        log_eta = jnp.where(b.jet_mask, log_eta, LOG_ZERO)
        log_untagged = log_soft_steps(b.jet_btag, p["btag_min"], r["btag_min"], LOG_ZERO)[1]

    def per_kinematic(pt):  # everything that depends on the (varied) jet pT: [B, K] -> ...
        p_sel = soft_step(pt, p["jet_pt_min"], r["jet_pt_min"]) * eta_w
        probs = jet_region_probs(p_sel, q_tag, config.min_jets)
        obs = {}
        if needed & {"ht", "nn"}:
            obs["ht"] = soft_ht(pt, p_sel)
        if needed & {"m_bjj", "nn"}:
            logs = None
            if narrow:
                log_pt = log_soft_steps(pt, p["jet_pt_min"], r["jet_pt_min"], LOG_ZERO)[0]
                logs = (jnp.maximum(log_pt + log_eta, LOG_ZERO), log_untagged)
            obs["m_bjj"] = soft_mbjj(pt, b.jet_cos_phi, b.jet_sin_phi, b.jet_sinh_eta, b.jet_mass, p_sel, q_tag,
                                     r["trijet_pt"], log_inputs=logs)
        if "nn" in needed:  # expected features under the soft selection (the hard ones in the hard limit)
            lead = nth_selected_value(pt, p_sel, 4)
            feats = {"ht": obs["ht"], "n_jets": jnp.sum(p_sel, axis=-1), "m_bjj": obs["m_bjj"],
                     "lepton_pt": jnp.sum(p_lep * b.lepton_pt, axis=-1),
                     **{f"jet{i + 1}_pt": lead[:, i] for i in range(4)}}
            obs["nn"] = nn.mlp(nn_weights, nn.stack_features(feats, jnp), jnp)
        values = {reg.name: obs[reg.observable] for reg in config.regions}
        sel = {reg.name: prob_lep * probs[reg.btag] for reg in config.regions}
        return values, sel, p_sel

    # kinematic variations share one compiled body (a loop over the variation axis of jet_pt)
    values, sel, p_sel = jax.lax.map(per_kinematic, jnp.moveaxis(b.jet_pt, 1, 0))  # [V, B, ...]
    factors = []
    if b.weight_variations:
        for bt in config.btag:  # expected pT of the i-th selected nominal jet
            lead = nth_selected_value(b.jet_pt[:, 0, :], p_sel[0], bt.n_jets)  # [B, n]
            for i in range(bt.n_jets):
                shift = exact_divide(bt.rate * lead[:, i], bt.pt_ref)
                factors += [1.0 + shift, 1.0 - shift]
    binning = {reg.name: (edges[reg.name], r["bandwidth"] * _bandwidth_unit(reg)) for reg in config.regions}
    return fill_variations(values, sel, b.weight, factors, binning, config.flow, config.kernel)


def _typed_inputs(params: Mapping, relax: Mapping, batch, config):
    """(cut parameters, relaxations, bin edges, network weights or None) in the batch's dtype."""
    dt = batch.dtype
    p = {k: jnp.asarray(params[k], dt) for k in config.parameters}
    r = {k: jnp.asarray(relax[k], dt) for k in config.relax_names}
    edges = region_edges(params, config, dt)
    nn_weights = None
    if config.uses_nn:
        if "nn" not in params:
            raise ValueError("a region uses the nn observable: params must hold its weights under 'nn'")
        nn_weights = {k: jnp.asarray(params["nn"][k], dt) for k in nn.WEIGHT_NAMES}
    return p, r, edges, nn_weights


def _blocks(batch):
    """The batch's arrays split into [blocks, block size, ...] (the unit of ``lax.scan``/``lax.map``)."""
    n, bsize = batch.n_padded, batch.block_size
    if n % bsize:
        raise ValueError(f"batch of {n} events is not a whole number of blocks of {bsize}")
    return jax.tree.map(lambda a: jnp.reshape(a, (n // bsize, bsize) + a.shape[1:]), batch)


@partial(jax.jit, static_argnames=("config",))
def soft_yields(params: Mapping, relax: Mapping, batch, config) -> dict:
    """Relaxed histograms of one dense batch: ``{region: {"sumw": [V, bins], "sumw2": [V, bins]}}``.

    ``config`` is a :class:`SoftConfig` (the AGC-specific program, :class:`EventBatch` batches) or a
    general :class:`~jacana.stages.definition.Definition` (:class:`~jacana.stages.dense.DenseBatch`).
    The variations axis follows ``config.variations(batch.weight_variations, batch.kinematic)``.
    A :class:`~jacana.stages.keyed.KeyedBatch` (several keys' events in one call) gives every key's
    histograms at once, ``[keys, V, bins]``. The event arithmetic runs in the batch's dtype (float32
    batches: mixed precision); the histograms are accumulated, and returned, in float64
    (:data:`ACCUMULATOR_DTYPE`) whatever it is.
    """
    from jacana.stages.definition import Definition
    from jacana.stages.engine import block_yields as general_block_yields

    keys = batch.keys if isinstance(batch, KeyedBatch) else ()
    p, r, edges, nn_weights = _typed_inputs(params, relax, batch, config)
    if isinstance(config, Definition):  # the general program takes the extra parameters by name
        block_fn, extra = general_block_yields, ({"nn": nn_weights} if nn_weights is not None else {})
    else:
        block_fn, extra = _block_yields, nn_weights

    @jax.checkpoint
    def body(acc, blk):
        contrib = block_fn(p, r, edges, extra, blk.keyed_events() if keys else blk, config)
        # each block's contribution added in float64 (a no-op cast for float64 batches)
        return jax.tree.map(lambda a, c: a + c.astype(ACCUMULATOR_DTYPE), acc, contrib), None

    n_var = len(config.variations(batch.weight_variations, batch.kinematic))
    shape = (len(keys),) * bool(keys)  # a KeyedBatch's histograms: one per key, the key axis first
    init = {reg.name: (jnp.zeros(shape + (n_var, len(reg.edges) - 1), ACCUMULATOR_DTYPE),) * 2
            for reg in config.regions}
    acc, _ = jax.lax.scan(body, init, _blocks(batch))
    return {k: {"sumw": v[0], "sumw2": v[1]} for k, v in acc.items()}


@partial(jax.jit, static_argnames=("config",))
def hard_events(params: Mapping, batch, config) -> tuple:
    """Per-event terms of one dense batch of a general analysis at the hard limit (:func:`hard_relax`):
    ``(values {region: [V, N]}, selected {region: [V, N]} booleans, factors [W, N])``
    (:func:`~jacana.stages.engine.block_events`), the input of the hard mode's histogram fill."""
    from jacana.stages.engine import block_events

    relax = {k: 0.0 for k in config.relax_names}
    p, r, _, nn_weights = _typed_inputs(params, relax, batch, config)
    extra = {"nn": nn_weights} if nn_weights is not None else {}
    values, sel, factors = jax.lax.map(lambda blk: block_events(p, r, extra, blk, config), _blocks(batch))
    # [blocks, V, block] -> [V, N]; factors [blocks, W, block] -> [W, N]
    join = lambda a: jnp.moveaxis(a, 0, -2).reshape(a.shape[1:-1] + (a.shape[0] * a.shape[-1],))  # noqa: E731
    return ({k: join(v) for k, v in values.items()}, {k: join(v) == 1 for k, v in sel.items()}, join(factors))


def batch_parts(batches: ChunkBatches | EventBatch | Sequence[EventBatch]) -> tuple[EventBatch, ...]:
    """The dense batches of a chunk (its jet-bucket parts), of one batch, or of a sequence of them."""
    if isinstance(batches, ChunkBatches):
        return batches.parts
    if isinstance(batches, EventBatch):
        return (batches,)
    return tuple(batches)


def add_yields(a, b):
    """Sum of two yield pytrees (chunks and jet buckets are additive). Parts computed on different
    devices (several GPUs) are added on the first one's device, in the same order as on one device."""
    if a is None:
        return b
    first_a, first_b = jax.tree.leaves(a)[0], jax.tree.leaves(b)[0]  # one part's results share a device
    if _elsewhere(first_a, first_b):
        b = jax.device_put(b, first_a.sharding)
    return jax.tree.map(jnp.add, a, b)


def _elsewhere(x, y) -> bool:
    """Whether two concrete arrays live on different devices (numpy arrays live nowhere in particular;
    inside a traced function everything is on the function's device)."""
    if not (isinstance(x, jax.Array) and isinstance(y, jax.Array)) or isinstance(x, jax.core.Tracer) \
            or isinstance(y, jax.core.Tracer):
        return False
    return x.devices() != y.devices()


def chunk_yields(params: Mapping, relax: Mapping, batches, config: SoftConfig) -> dict:
    """:func:`soft_yields` summed over the jet-bucket parts of a chunk."""
    total = None
    for part in batch_parts(batches):
        total = add_yields(total, soft_yields(params, relax, part, config))
    return total


def assemble_histograms(results: Iterable[tuple[str, str, Mapping]], config: SoftConfig,
                        params: Mapping | None = None) -> dict:
    """Per-(sample, file variation) yields -> ``{region: {sample: {variation: {"edges","sumw","sumw2"}}}}``.

    ``results`` yields ``(sample, file_variation, yields)`` with ``yields`` from
    :func:`chunk_yields`; repeated (sample, file variation) pairs (several chunks) are summed.
    Nominal files give ``config.variations(True)``; an alternative file gives its own name.
    """
    edges = {k: np.asarray(v, dtype=np.float64) for k, v in region_edges(params or {}, config).items()}
    out: dict = {r.name: {} for r in config.regions}
    for sample, file_var, ylds in results:
        nominal = file_var == NOMINAL
        names = config.variations(True) if nominal else (file_var,)
        for reg in config.regions:
            sumw = np.asarray(ylds[reg.name]["sumw"], dtype=np.float64)
            sumw2 = np.asarray(ylds[reg.name]["sumw2"], dtype=np.float64)
            if sumw.shape[0] != len(names):
                raise ValueError(f"{sample}/{file_var}: {sumw.shape[0]} variations in the yields, expected {names}")
            slot = out[reg.name].setdefault(sample, {})
            for i, name in enumerate(names):
                if name in slot:
                    slot[name]["sumw"] = slot[name]["sumw"] + sumw[i]
                    slot[name]["sumw2"] = slot[name]["sumw2"] + sumw2[i]
                else:
                    slot[name] = {"edges": edges[reg.name], "sumw": sumw[i].copy(), "sumw2": sumw2[i].copy()}
    return out


def soft_histograms(batches: ChunkBatches, spec: AnalysisSpec, params: Mapping | None = None,
                    relax: Mapping | None = None, config: SoftConfig | None = None) -> dict:
    """Soft histograms of one chunk as ``{region: {variation: {"edges","sumw","sumw2"}}}``.

    The soft counterpart of ``{r: {v: to_arrays(h)}}`` of the reference's ``fill_histograms``;
    defaults: the spec's parameters and the hard limit.
    """
    config = config or soft_config(spec)
    params = default_params(spec) if params is None else params
    relax = hard_relax(spec) if relax is None else relax
    ylds = chunk_yields(params, relax, batches, config)
    if ylds is None:  # no events survive the prefilter
        ylds = _empty_yields(config, batches.variation == NOMINAL)
    full = assemble_histograms([(batches.sample, batches.variation, ylds)], config, params)
    return {reg: by_sample[batches.sample] for reg, by_sample in full.items()}


def _empty_yields(config: SoftConfig, nominal_file: bool) -> dict:
    nv = len(config.variations(nominal_file))
    return {r.name: {"sumw": np.zeros((nv, len(r.edges) - 1)), "sumw2": np.zeros((nv, len(r.edges) - 1))}
            for r in config.regions}


def hard_mode_histograms(columns, spec: AnalysisSpec, replicas: np.ndarray | None = None) -> dict:
    """Hard-mode histograms of one chunk of a general analysis, ``{region: {variation: hist.Hist}}``
    (the counterpart of :func:`~jacana.stages.reference.fill_histograms`, ``replicas`` as there).

    The same observable and selection functions as the soft mode, at the hard limit (every selection
    weight exactly 0 or 1, :func:`hard_events`), give each event's observable value, selection and
    weight factors; the selected events then fill ``hist`` histograms in file order, the conventional
    way, so the AGC written in the general form reproduces the AGC's hard histograms bit for bit.
    """
    from jacana.stages.dense import make_dense_batches
    from jacana.stages.reference import event_weight, fill_selected

    config = spec.definition
    n = len(columns)
    if replicas is not None and (replicas.ndim != 2 or replicas.shape[1] != n):
        raise ValueError(f"{columns.chunk.path}: replicas must be [R, {n}] (one row per replica, one column per"
                         f" event of the chunk), got {replicas.shape}")
    batches = make_dense_batches(columns, spec, prefilter=True)
    params = default_params(spec)
    nominal_file = batches.variation == NOMINAL
    names = config.variations(True) if nominal_file else (batches.variation,)
    n_kin = len(config.kinematic) if nominal_file else 1
    # per part: the real events' terms, then all parts put back in file order
    rows, values, selected, factors = [], {}, {}, []
    for part, part_rows in zip(batches.parts, batches.rows):
        v, sel, f = jax.device_get(hard_events(params, part, config))
        k = len(part_rows)
        rows.append(part_rows)
        for reg in config.regions:
            values.setdefault(reg.name, []).append(v[reg.name][:, :k])
            selected.setdefault(reg.name, []).append(sel[reg.name][:, :k])
        factors.append(f[:, :k])
    rows = np.concatenate(rows) if rows else np.zeros(0, np.int64)
    order = np.argsort(rows, kind="stable")
    rows = rows[order]
    weight = event_weight(columns, spec)
    n_factors = len(names) - n_kin
    f_all = np.concatenate(factors, axis=1)[:, order] if factors else np.zeros((n_factors, 0))
    out: dict = {reg.name: {} for reg in config.regions}
    for reg in config.regions:
        val = np.concatenate(values[reg.name], axis=1)[:, order] if rows.size else np.zeros((n_kin, 0))
        sel = np.concatenate(selected[reg.name], axis=1)[:, order] if rows.size else np.zeros((n_kin, 0), bool)
        for i in range(n_kin):
            m = sel[i]
            events = rows[m]
            w = weight[events]
            weights = {names[i]: w}
            if i == 0 and nominal_file:
                weights.update({names[n_kin + j]: w * f_all[j][m] for j in range(n_factors)})
            out[reg.name].update(fill_selected(np.asarray(reg.edges), val[i][m], weights,
                                               None if replicas is None else replicas[:, events]))
    return out
