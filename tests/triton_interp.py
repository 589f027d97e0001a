"""Source prepended to subprocess scripts that run Triton kernels under TRITON_INTERPRET=1 on CPU:
triton 3.6's interpreter calls int() on 1-element numpy arrays, which numpy >= 2 refuses."""
PATCH = r'''
import numpy as np
import triton.runtime.interpreter as I
_orig = I._patch_lang_tensor
def _patch(tensor, scope):
    _orig(tensor, scope)
    scope.set_attr(tensor, "__index__", lambda self: int(np.asarray(self.handle.data).reshape(-1)[0]))
I._patch_lang_tensor = _patch
'''
