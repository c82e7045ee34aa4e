"""Memory requests of the Triton kernels, counted without a GPU.

Under Triton's interpreter (TRITON_INTERPRET=1) every program of a launch runs
in Python; ``count_requests()`` records each ``tl.load`` and ``tl.store`` a
program executes and counts the distinct 32-byte sectors its unmasked
addresses touch (what one instruction requests from the memory system),
summed per launch. A tile loaded once per channel block counts once however
many offsets use it; the same tile loaded again by another program, or by
another instruction of the same program, counts again: the figure is the
traffic between the cores and the caches, an upper bound of DRAM traffic.
"""

import contextlib
from typing import Dict, Iterator, List

import numpy as np

SECTOR_BYTES = 32


def _sectors(ptrs, mask) -> int:
    addresses = ptrs.data[mask.data] if mask is not None else np.ravel(ptrs.data)
    return int(np.unique(addresses.astype(np.uint64) // SECTOR_BYTES).size)


@contextlib.contextmanager
def count_requests() -> Iterator[List[Dict]]:
    """Yields a list that receives one dict per kernel launch inside the
    block: kernel name, programs, loads and stores executed, and the sectors
    each kind requested (``requested_bytes`` = 32 x all sectors)."""
    from triton.runtime import interpreter

    builder = interpreter.interpreter_builder
    launches: List[Dict] = []
    load, store = builder.create_masked_load, builder.create_masked_store
    call = interpreter.GridExecutor.__call__

    def counted_load(ptrs, mask, *args):
        launches[-1]["load_sectors"] += _sectors(ptrs, mask)
        launches[-1]["loads"] += 1
        return load(ptrs, mask, *args)

    def counted_store(ptrs, value, mask, *args):
        launches[-1]["store_sectors"] += _sectors(ptrs, mask)
        launches[-1]["stores"] += 1
        return store(ptrs, value, mask, *args)

    def counted_call(self, *args, **kwargs):
        launches.append({"kernel": self.fn.__name__, "loads": 0, "stores": 0,
                         "load_sectors": 0, "store_sectors": 0})
        result = call(self, *args, **kwargs)
        launch = launches[-1]
        launch["requested_bytes"] = SECTOR_BYTES * (launch["load_sectors"]
                                                    + launch["store_sectors"])
        return result

    builder.create_masked_load, builder.create_masked_store = counted_load, counted_store
    interpreter.GridExecutor.__call__ = counted_call
    try:
        yield launches
    finally:
        del builder.create_masked_load, builder.create_masked_store
        interpreter.GridExecutor.__call__ = call
