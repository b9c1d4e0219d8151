"""torch.compile of the DiT blocks: fuses the elementwise work around AdaLN, RoPE, norms and gates.

Blocks share one graph per input shape (their index is not specialised), so compilation is paid
once per resolution, not once per block. Nothing a block branches on may depend on its index:
the model resolves each block's guidance skips before calling it (inputs.BlockSkips). When the
block looked up `index in stg_blocks` itself, the official guidance (STG on block 29) made one
graph per block: 49 for a 19B request instead of 3 (issue 19; the first request ran > 400 s on an
H100 without finishing). An official-guidance two-stage request compiles 4 graphs per shape: stage
1's blocks before the STG block on 3 rows (the STG row shares the cond row's prefix:
inputs.SharedPrefix), the STG block (its self-attention keep-mask) and the blocks after it on 4 rows,
stage 2's block; plain CFG 2 (test_compile.py). NVTX ranges (LTX2_TP_NVTX=1) name the block and do specialise on it.

Warm starts: `use_compile_cache(dir)` puts inductor's on-disk caches in `dir` (FX graph cache,
AOTAutograd cache, the Triton kernels and their autotuning results: all under
TORCHINDUCTOR_CACHE_DIR; torch 2.11 and 2.13 have the FX and AOTAutograd caches on by default,
set here anyway). A process that compiles a block graph already in the cache loads it instead:
on CPU here the tiny DiT's block took 82 s to compile and 10 s from the cache
(test/test_warm_start.py, LTX2_TP_SLOW=1); only Dynamo's tracing is redone. The weights are graph inputs, so
one cache serves any checkpoint of the same architecture. Without a directory torch uses
/tmp/torchinductor_<user>, which a new machine or container does not have.
"""

from __future__ import annotations

import os
from pathlib import Path


def compile_blocks(model, mode: str | None = None, backend="inductor") -> None:
    import torch._dynamo

    torch._dynamo.config.allow_unspec_int_on_nn_module = True
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 256)
    for block in model.transformer_blocks:
        block.compile(backend=backend, mode=mode, dynamic=False)


def use_compile_cache(directory: str | Path) -> Path:
    """Inductor's caches in `directory` (created). Call before the first compiled forward."""
    import torch._functorch.config
    import torch._inductor.config

    path = Path(directory).expanduser().resolve()
    path.mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(path)  # read by inductor at each use
    torch._inductor.config.fx_graph_cache = True
    torch._inductor.config.autotune_local_cache = True
    torch._functorch.config.enable_autograd_cache = True
    return path


def compile_cache_stats() -> dict[str, int]:
    """This process's cache hits and misses so far (a miss is a graph compiled here), and the graphs
    Dynamo traced (each compiled or loaded from the cache; a request should add none once warm)."""
    from torch._dynamo.utils import counters

    return {"dynamo_graphs": counters["stats"]["unique_graphs"],
            "fx_graph_cache_hits": counters["inductor"]["fxgraph_cache_hit"],
            "fx_graph_cache_misses": counters["inductor"]["fxgraph_cache_miss"],
            "aot_autograd_cache_hits": counters["aot_autograd"]["autograd_cache_hit"],
            "aot_autograd_cache_misses": counters["aot_autograd"]["autograd_cache_miss"]}
