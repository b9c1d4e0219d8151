"""torch.compile of the DiT blocks: fuses the elementwise work around AdaLN, RoPE, norms and gates.

Blocks share one graph per input shape (their index is not specialised), so compilation is paid
once per resolution, not once per block.
"""

from __future__ import annotations


def compile_blocks(model, mode: str | None = None, backend="inductor") -> None:
    import torch._dynamo

    torch._dynamo.config.allow_unspec_int_on_nn_module = True
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 256)
    for block in model.transformer_blocks:
        block.compile(backend=backend, mode=mode, dynamic=False)
