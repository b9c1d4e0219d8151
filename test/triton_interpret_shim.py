"""Test-only fixes to Triton 3.6's CPU interpreter (TRITON_INTERPRET=1) for the dtypes the fp8
attention kernel uses, so that the interpreted kernel computes what the GPU would:
- fp32 -> e4m3 / bf16 casts round to nearest even (the interpreter truncates bf16 and loses the
  exponent carry of e4m3: 124.0 -> 64.0, and flushes e4m3 subnormals to zero);
- bf16 dot operands (stored as uint16 bits, which the interpreter multiplies as integers);
- a 1-element tensor as a Python index (numpy >= 2.3 refuses int() of a 1-d array).
Import it before the kernel module is imported.
"""

from __future__ import annotations

import numpy as np
import torch
import triton.language as tl
import triton.runtime.interpreter as interp

_TORCH = {tl.float8e4nv: (torch.float8_e4m3fn, torch.uint8, np.uint8),
          tl.bfloat16: (torch.bfloat16, torch.int16, np.uint16)}
_convert_float = interp._convert_float


def _convert(data, in_dtype, out_dtype, rounding_mode):
    if in_dtype == tl.float32 and out_dtype in _TORCH:
        dt, bits, np_bits = _TORCH[out_dtype]
        t = torch.from_numpy(np.ascontiguousarray(data).view(np.float32).copy())
        return t.to(dt).view(bits).numpy().view(np_bits)
    return _convert_float(data, in_dtype, out_dtype, rounding_mode)


_create_dot = interp.InterpreterBuilder.create_dot


def _bf16_as_fp32(h):
    if h.dtype.scalar == tl.bfloat16:
        return interp.TensorHandle((h.data.astype(np.uint32) << 16).view(np.float32), tl.float32)
    return h


def _dot(self, a, b, d, input_precision, max_num_imprecise_acc):
    return _create_dot(self, _bf16_as_fp32(a), _bf16_as_fp32(b), d, input_precision, max_num_imprecise_acc)


_patch_lang_tensor = interp._patch_lang_tensor


def _patch_tensor(tensor, scope):
    _patch_lang_tensor(tensor, scope)
    scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))


interp._convert_float = _convert
interp.InterpreterBuilder.create_dot = _dot
interp._patch_lang_tensor = _patch_tensor
