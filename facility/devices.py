"""Call and block sizes per device platform: how many events one compiled call covers, and how
many events one step of its block loop (``lax.scan`` in :func:`~jacana.stages.analysis.soft_yields`)
processes.

* CPU: what is fastest there and what jacana has always used: calls of :data:`CPU_CALL_EVENTS`
  events, blocks of :func:`jacana.stages.batch.block_size_for` (cache-sized). These values fix the
  order of every float sum, so CPU results stay bit-identical to earlier releases.
* Accelerators (any platform but ``"cpu"``: ``"gpu"``, ``"cuda"``, ``"rocm"``, ``"tpu"``): a gradient
  step should be a handful of large programs, not ~100 small ones that leave the device waiting
  on the host's dispatch. A call covers up to :data:`ACCELERATOR_CALL_EVENTS` events, and its blocks
  about :data:`ACCELERATOR_BLOCK_ELEMENTS` event x trijet elements (the forward-mode Jacobian's
  temporaries take about 100-200 bytes per element in float64: a few GB at most).

With a fixed large call size every (sample, jet bucket) group would be padded up to it (at 1 M
events the 50 groups hold 2 to 102k events each), so on accelerators a group's call is sized to
the group (``call_events_for(platform, n_events, block)``): one call, padded to a whole number of
blocks of the 2^k / 3 x 2^(k-1) form, up to the cap.
"""

from __future__ import annotations

from jacana.stages.shapes import BLOCK_ELEMENTS, block_size_for, padded_events

#: Platform name of JAX's CPU devices; every other platform counts as an accelerator.
CPU_PLATFORM = "cpu"
#: Events per compiled call on the CPU (the executors' fixed call size since they were written).
CPU_CALL_EVENTS = 4096
#: Most events per compiled call on an accelerator (2^19: one call per group up to ~4 M events).
ACCELERATOR_CALL_EVENTS = 1 << 19
#: Event x trijet elements per block on an accelerator (2^24; the CPU's is BLOCK_ELEMENTS, 2^16).
ACCELERATOR_BLOCK_ELEMENTS = 1 << 24
#: Elements each event counts as at least (per-event arrays: bin masses, tangents): blocks of at most
#: ACCELERATOR_BLOCK_ELEMENTS / 64 = 2^18 events.
ACCELERATOR_MIN_ELEMENTS_PER_EVENT = 64


def is_accelerator(platform: str) -> bool:
    """Whether ``platform`` (a JAX device's ``.platform``) is anything but the CPU."""
    if not isinstance(platform, str) or not platform:
        raise ValueError(f"platform must be a JAX platform name such as 'cpu' or 'gpu', got {platform!r}")
    return platform.lower() != CPU_PLATFORM


def platform_of_default_device() -> str:
    """Platform (``"cpu"``, ``"gpu"``, ...) of the device JAX puts new arrays on: ``jax_default_device``
    when set (a device or a platform name), else the default backend's first device."""
    import jax

    dev = jax.config.jax_default_device
    if dev is None:
        return jax.devices()[0].platform
    if isinstance(dev, str):
        return dev.lower()
    return dev.platform


def block_events_for(n_jets: int, platform: str) -> int:
    """Events per processing block of a jet bucket of ``n_jets`` jets (a power of two).

    CPU: :func:`~jacana.stages.batch.block_size_for` (about BLOCK_ELEMENTS event x trijet elements).
    Accelerators: about ACCELERATOR_BLOCK_ELEMENTS elements, each event at least
    ACCELERATOR_MIN_ELEMENTS_PER_EVENT of them."""
    if not is_accelerator(platform):
        return block_size_for(n_jets)
    return block_size_for(n_jets, elements=ACCELERATOR_BLOCK_ELEMENTS,
                          min_per_event=ACCELERATOR_MIN_ELEMENTS_PER_EVENT)


def call_events_for(platform: str, n_events: int | None = None, block: int | None = None) -> int:
    """Events per compiled call.

    CPU: CPU_CALL_EVENTS, whatever ``n_events`` (every call has that shape). Accelerators:
    ACCELERATOR_CALL_EVENTS; given a group's ``n_events`` and the ``block`` it will be processed in
    (:func:`block_events_for`), the size of ONE call that holds them, if below that cap: ``n_events``
    padded to a whole number of blocks (:func:`~jacana.stages.batch.padded_events`). The result is
    always a whole number of ``min(block, result)`` events."""
    if not is_accelerator(platform):
        return CPU_CALL_EVENTS
    if n_events is None:
        return ACCELERATOR_CALL_EVENTS
    if block is None or block < 1 or block & (block - 1) or block > ACCELERATOR_CALL_EVENTS:
        raise ValueError(f"block must be a power of two <= {ACCELERATOR_CALL_EVENTS} with n_events, got {block!r}")
    padded, _ = padded_events(max(int(n_events), 1), block)
    return min(padded, ACCELERATOR_CALL_EVENTS)


def local_devices() -> list:
    """The devices of the default device's platform in this process (every GPU of a node; on a CPU
    machine one device, unless XLA is told to split the host: ``--xla_force_host_platform_device_count``)."""
    import jax

    return jax.local_devices(backend=platform_of_default_device())


#: Where the likelihood (the objective stage) runs: "auto" (the CPU when the events are on an
#: accelerator), "cpu", or "default" (JAX's default device).
LIKELIHOOD_DEVICES = ("auto", "cpu", "default")


def likelihood_device(choice: str = "auto", platform: str | None = None):
    """The JAX device for the likelihood, or None for JAX's default device.

    "auto" picks the host CPU when the default device (``platform``, default: JAX's) is an
    accelerator: the AGC model's ``value_and_grad`` took 2.8 / 10.1 ms (sigma_mu / Z0) on an H200
    and 1.3 / 5.7 ms on a 2-core CPU (docs/bench.md, rows 7a/7b), and the yields reach the
    objective as host arrays, so the CPU also saves their copy to the device and the gradient's
    copy back. On a CPU machine "auto" is the default device.
    """
    import jax

    if choice not in LIKELIHOOD_DEVICES:
        raise ValueError(f"likelihood device must be one of {LIKELIHOOD_DEVICES}, got {choice!r}")
    if choice == "default" or (choice == "auto" and not is_accelerator(platform or platform_of_default_device())):
        return None
    return jax.local_devices(backend=CPU_PLATFORM)[0]


def assign_devices(costs, n_devices: int) -> list[int]:
    """Device index for each of the calls with ``costs`` (e.g. events x objects): the largest first,
    each to the least-loaded device (longest-processing-time first: within 4/3 of the best balance).

    >>> assign_devices([8, 1, 5, 4, 2], 2)
    [0, 1, 1, 1, 0]
    """
    if n_devices < 1:
        raise ValueError(f"n_devices must be at least 1, got {n_devices}")
    load = [0.0] * n_devices
    out = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: -costs[i]):  # stable: equal costs keep their order
        d = min(range(n_devices), key=lambda k: load[k])
        out[i] = d
        load[d] += costs[i]
    return out


__all__ = ["ACCELERATOR_BLOCK_ELEMENTS", "ACCELERATOR_CALL_EVENTS", "ACCELERATOR_MIN_ELEMENTS_PER_EVENT",
           "BLOCK_ELEMENTS", "CPU_CALL_EVENTS", "CPU_PLATFORM", "LIKELIHOOD_DEVICES", "block_events_for",
           "call_events_for", "assign_devices", "is_accelerator", "likelihood_device", "local_devices",
           "platform_of_default_device"]
