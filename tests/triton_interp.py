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


def run_interpreted(code: str) -> str:
    """Run PATCH + code in a subprocess under TRITON_INTERPRET=1 (CPU) with the repository on the path; its stdout."""
    import os
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run([sys.executable, "-c", PATCH + code], env=env, capture_output=True, text=True, timeout=300,
                       cwd=root)
    return r.stdout + ("" if r.returncode == 0 else "\nexit " + str(r.returncode) + "\n" + r.stderr[-3000:])
