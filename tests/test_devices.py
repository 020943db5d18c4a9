"""Call and block sizes per device platform (jacana.facility.devices): the CPU keeps exactly its
historical sizes (bit-identical results); accelerators get large calls sized to each group."""

from __future__ import annotations

import pytest

from jacana.facility import devices
from jacana.facility.devices import (ACCELERATOR_CALL_EVENTS, CPU_CALL_EVENTS, block_events_for, call_events_for,
                                     is_accelerator, platform_of_default_device)
from jacana.stages.shapes import MIN_BLOCK, block_size_for

JETS = (4, 6, 8, 12, 16, 24, 32, 48, 64)


def test_cpu_sizes_are_the_historical_ones():
    assert CPU_CALL_EVENTS == 4096
    assert [block_size_for(k) for k in JETS] == [16384, 2048, 1024, 256, 128, 128, 128, 128, 128]
    for k in JETS:
        assert block_events_for(k, "cpu") == block_size_for(k)
    for n in (None, 1, 5000, 10 ** 7):
        assert call_events_for("cpu", n, 128) == CPU_CALL_EVENTS
    assert call_events_for("CPU") == CPU_CALL_EVENTS


@pytest.mark.parametrize("platform", ["gpu", "cuda", "rocm", "tpu"])
def test_accelerator_calls_are_large_and_whole_numbers_of_blocks(platform):
    assert is_accelerator(platform)
    assert call_events_for(platform) == ACCELERATOR_CALL_EVENTS >= 1 << 17
    for k in JETS:
        block = block_events_for(k, platform)
        assert block >= block_size_for(k) and block & (block - 1) == 0 and block >= MIN_BLOCK
        assert block <= devices.ACCELERATOR_BLOCK_ELEMENTS // devices.ACCELERATOR_MIN_ELEMENTS_PER_EVENT
        for n in (1, 2, 127, 129, 5_000, 33_849, 102_105, 408_420, 3_000_000):
            call = call_events_for(platform, n, block)
            assert call <= ACCELERATOR_CALL_EVENTS
            assert call % min(block, call) == 0  # rebatch processes min(block, call)-event blocks
            if n <= ACCELERATOR_CALL_EVENTS:
                assert n <= call <= max(2 * n, MIN_BLOCK)  # one call, padding bounded
            else:
                assert call == ACCELERATOR_CALL_EVENTS
    with pytest.raises(ValueError, match="block"):
        call_events_for(platform, 1000)
    with pytest.raises(ValueError, match="block"):
        call_events_for(platform, 1000, 3000)


def test_platform_names():
    assert platform_of_default_device() == "cpu"  # the test session runs on JAX_PLATFORMS=cpu
    assert not is_accelerator("cpu")
    with pytest.raises(ValueError, match="platform"):
        is_accelerator("")


def test_calls_are_spread_over_devices_largest_first_to_the_least_loaded():
    from jacana.facility.devices import assign_devices

    assert assign_devices([8, 1, 5, 4, 2], 2) == [0, 1, 1, 1, 0]  # loads 10 and 10
    assert assign_devices([3, 3, 3], 1) == [0, 0, 0]
    costs = [100, 7, 7, 7, 50, 50, 1]
    where = assign_devices(costs, 3)
    loads = [sum(c for c, d in zip(costs, where) if d == k) for k in range(3)]
    assert loads == [100, 64, 58]  # the largest call alone; the rest balanced
    with pytest.raises(ValueError, match="at least 1"):
        assign_devices([1], 0)


MULTI_DEVICE = r"""
import os
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
import jax, numpy as np
jax.config.update("jax_enable_x64", True)
from jacana.facility.executor import InProcessExecutor
from jacana.facility.hardrun import analysis_chunks
from jacana.samples.synthetic import generate
from jacana.stages.analysis import default_params, default_relax
from jacana.stages.fileset import load_fileset
from jacana.stages.spec import load_spec
spec = load_spec()
chunks = analysis_chunks(spec, load_fileset(generate(os.environ["OUT"], events=4000, seed=3, progress=False)), 2000)
p, r = default_params(spec), default_relax(spec)
one, two = InProcessExecutor(spec, chunks, devices=jax.devices()[:1]), InProcessExecutor(spec, chunks)
used = {d for v in two.batches.values() for b in v for d in b.weight.devices()}
assert len(two.devices) == 2 and len(used) == 2, used
(y1, j1), (y2, j2) = one.yields_and_jacobian(p, r), two.yields_and_jacobian(p, r)
ct = jax.tree.map(lambda x: np.ones_like(np.asarray(x)), y1)
g1, g2 = one.yields_vjp(p, r, ct)[1], two.yields_vjp(p, r, ct)[1]
for a, b in zip(jax.tree.leaves((y1, j1, g1)), jax.tree.leaves((y2, j2, g2))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
print("ok")
"""


@pytest.mark.slow  # a fresh process with two (host) devices compiles every shape twice: about 2 minutes
def test_an_executor_on_two_devices_gives_the_one_device_numbers_bit_for_bit(tmp_path):
    """Several GPUs of a node in one process: each call on one device, sums on the first. Checked on
    the CPU split into two XLA devices: yields, Jacobians and VJPs identical to one device."""
    import os
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-c", MULTI_DEVICE], env={**os.environ, "OUT": str(tmp_path)},
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stderr[-3000:]


def test_the_likelihood_runs_on_the_host_when_the_events_are_on_an_accelerator():
    import jax

    cpu = jax.local_devices(backend="cpu")[0]
    assert devices.likelihood_device("auto", platform="gpu") == cpu
    assert devices.likelihood_device("auto", platform="cpu") is None  # JAX's default device: the CPU
    assert devices.likelihood_device("default", platform="gpu") is None
    assert devices.likelihood_device("cpu", platform="gpu") == cpu
    with pytest.raises(ValueError, match="likelihood device"):
        devices.likelihood_device("tpu")


def test_accelerator_calls_give_the_cpu_numbers(tmp_path):
    """The GPU path's calls (one per (file kind, jet bucket) over every key's events, padded to large
    blocks: KeyedBatch) and the CPU's (per key, 4096-event calls in cache-sized blocks) give the same
    yields, Jacobians and VJPs in float64, to 1e-9 (issue 25), run here on the CPU: four keys (two
    nominal files, two alternative ones) in their most populated jet bucket, through the stage."""
    import numpy as np

    from jacana.facility.executor import resident_calls
    from jacana.samples.synthetic import generate
    from jacana.stages.analysis import default_params, default_relax, soft_config
    from jacana.stages.batch import regroupable_batches
    from jacana.stages.columns import read_chunk
    from jacana.stages.fileset import load_fileset
    from jacana.stages.keyed import KeyedBatch
    from jacana.stages.soft_stage import SoftYieldsStage, params_inputs, relax_inputs, yields_name
    from jacana.stages.spec import load_spec

    spec = load_spec()
    fileset = load_fileset(generate(tmp_path, events=40_000, seed=41, files_per_sample=1, progress=False))
    config, params, relax = soft_config(spec), default_params(spec), default_relax(spec)
    keys = [("ttbar", "nominal"), ("wjets", "nominal"), ("ttbar", "PS_var"), ("ttbar", "ME_var")]
    parts = {k: regroupable_batches(read_chunk(fileset.chunks(*k, chunk_size=100_000)[0], spec), spec).parts
             for k in keys}
    width = max({p.bucket_width for p in parts[keys[0]]},
                key=lambda w: sum(int(np.sum(p.event_mask)) for p in parts[keys[0]] if p.bucket_width == w))
    parts = {k: [p for p in v if p.bucket_width == width] for k, v in parts.items()}
    on_cpu, on_gpu = resident_calls(parts, platform="cpu"), resident_calls(parts, platform="gpu")
    assert sorted(on_cpu) == sorted(keys)
    gpu_calls = [c for v in on_gpu.values() for c in v]
    assert [(type(c), c.keys) for c in gpu_calls] == [(KeyedBatch, tuple(keys[:2])), (KeyedBatch, tuple(keys[2:]))]
    assert sum(len(v) for v in on_cpu.values()) > len(gpu_calls)
    assert {c.n_padded for v in on_cpu.values() for c in v} == {4096}
    assert [c.block_size for c in gpu_calls] == [c.n_padded for c in gpu_calls]  # a group this small: one block

    p, i = params_inputs(params), relax_inputs(relax)
    cpu, gpu = SoftYieldsStage(config, keys, params, on_cpu), SoftYieldsStage(config, keys, params, on_gpu)
    (y_cpu, j_cpu), (y_gpu, j_gpu) = cpu.jacobian(p, i, tuple(p)), gpu.jacobian(p, i, tuple(p))
    rng = np.random.default_rng(0)
    ct = {n: rng.normal(size=y.shape) for n, y in y_cpu.items()}
    g_cpu, g_gpu = cpu.vjp(p, i, ct, tuple(p)), gpu.vjp(p, i, ct, tuple(p))
    for want, got in ((y_cpu, y_gpu), (j_cpu, j_gpu), (g_cpu, g_gpu)):
        assert sorted(want) == sorted(got)
        for n, a in want.items():
            np.testing.assert_allclose(got[n], a, rtol=1e-9, atol=1e-9 * float(np.max(np.abs(a), initial=0.0)))
    for k in keys:  # every key has events, and they differ: a mix-up of keys would show
        assert float(np.sum(y_cpu[yields_name(k, "4j1b", "sumw")])) > 0
    assert not np.allclose(y_cpu[yields_name(keys[0], "4j1b", "sumw")], y_cpu[yields_name(keys[1], "4j1b", "sumw")])


def test_calls_are_merged_across_keys_only_on_accelerators_and_for_stages_that_take_them():
    from jacana.facility.executor import merges_keys
    from jacana.stages.soft_stage import SoftYieldsStage

    assert merges_keys(SoftYieldsStage, "gpu") and merges_keys(SoftYieldsStage, "cuda")
    assert not merges_keys(SoftYieldsStage, "cpu")  # the CPU keeps its per-key calls (bit-identical sums)

    def custom_factory(config, keys, params_like, batches=None):  # a user's stage: sees each key's own calls
        return SoftYieldsStage(config, keys, params_like, batches)

    assert not merges_keys(custom_factory, "gpu")


EXECUTOR_LAYOUTS = r"""
import os
import jax, numpy as np
jax.config.update("jax_enable_x64", True)
from jacana.facility.executor import InProcessExecutor
from jacana.facility.hardrun import analysis_chunks
from jacana.samples.synthetic import generate
from jacana.stages.analysis import default_params, default_relax
from jacana.stages.fileset import load_fileset
from jacana.stages.keyed import KeyedBatch
from jacana.stages.spec import load_spec
spec = load_spec()
chunks = analysis_chunks(spec, load_fileset(generate(os.environ["OUT"], events=6000, seed=3, progress=False)), 3000)
p, r = default_params(spec), default_relax(spec)
cpu, gpu = InProcessExecutor(spec, chunks), InProcessExecutor(spec, chunks, platform="gpu")
assert not any(isinstance(c, KeyedBatch) for c in cpu.calls())
assert sum(isinstance(c, KeyedBatch) for c in gpu.calls()) >= 4 and len(gpu.calls()) * 3 < len(cpu.calls())
(y1, j1), (y2, j2) = cpu.yields_and_jacobian(p, r), gpu.yields_and_jacobian(p, r)
ct = jax.tree.map(lambda x: np.ones_like(np.asarray(x)), y1)
g1, g2 = cpu.yields_vjp(p, r, ct)[1], gpu.yields_vjp(p, r, ct)[1]
f1, f2 = cpu.yields(p, r), gpu.yields(p, r)
for a, b in zip(jax.tree.leaves((y1, j1, g1, f1)), jax.tree.leaves((y2, j2, g2, f2))):
    a, b = np.asarray(a), np.asarray(b)
    np.testing.assert_allclose(b, a, rtol=1e-9, atol=1e-9 * float(np.max(np.abs(a), initial=0.0)))
print("ok", len(cpu.calls()), len(gpu.calls()))
"""


@pytest.mark.slow  # a fresh process compiles both layouts' programs (forward, Jacobian, VJP): about 2 minutes
def test_an_executor_laid_out_for_an_accelerator_gives_the_cpu_numbers(tmp_path):
    """The whole analysis, every key, laid out as on a GPU (KeyedBatch calls per file kind and jet
    bucket) and as on the CPU, both run here: yields, Jacobians, VJPs and forward yields to 1e-9."""
    import os
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-c", EXECUTOR_LAYOUTS], env={**os.environ, "OUT": str(tmp_path)},
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0 and "ok" in run.stdout, run.stderr[-3000:]
