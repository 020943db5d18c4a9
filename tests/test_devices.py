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
