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


def test_accelerator_sized_calls_give_the_cpu_numbers(tmp_path):
    """The GPU path's calls (one per group, padded to large blocks) and the CPU's (4096-event calls in
    cache-sized blocks) give the same yields and Jacobians in float64, to 1e-9 (issue 25), run here
    on the CPU. Two keys (a nominal and an alternative file), their most populated jet bucket."""
    import jax
    import numpy as np

    from jacana.facility.executor import rebatch
    from jacana.samples.synthetic import generate
    from jacana.stages.analysis import default_params, default_relax, soft_config
    from jacana.stages.batch import regroupable_batches
    from jacana.stages.columns import read_chunk
    from jacana.stages.fileset import load_fileset
    from jacana.stages.jacobian import yields_and_jacobian
    from jacana.stages.spec import load_spec

    spec = load_spec()
    fileset = load_fileset(generate(tmp_path, events=40_000, seed=41, files_per_sample=1, progress=False))
    config, params, relax = soft_config(spec), default_params(spec), default_relax(spec)
    for sample, variation in (("ttbar", "nominal"), ("ttbar", "PS_var")):
        parts = regroupable_batches(read_chunk(fileset.chunks(sample, variation, chunk_size=100_000)[0], spec),
                                    spec).parts
        widest = max({p.bucket_width for p in parts}, key=lambda w: sum(int(np.sum(p.event_mask)) for p in parts
                                                                          if p.bucket_width == w))
        group = [p for p in parts if p.bucket_width == widest]
        on_cpu, on_gpu = rebatch(group, platform="cpu"), rebatch(group, platform="gpu")
        layout = lambda calls: [(b.n_padded, b.block_size) for b in calls]  # noqa: E731
        assert len(on_gpu) == 1 and layout(on_gpu) != layout(on_cpu), (layout(on_gpu), layout(on_cpu))
        y_cpu, j_cpu = yields_and_jacobian(params, relax, on_cpu, config)
        y_gpu, j_gpu = yields_and_jacobian(params, relax, on_gpu, config)
        for a, b in zip(jax.tree.leaves((y_cpu, j_cpu)), jax.tree.leaves((y_gpu, j_gpu))):
            a, b = np.asarray(a), np.asarray(b)
            np.testing.assert_allclose(b, a, rtol=1e-9, atol=1e-9 * float(np.max(np.abs(a), initial=0.0)))
        assert float(np.sum(np.asarray(y_cpu["4j1b"]["sumw"]))) > 0
