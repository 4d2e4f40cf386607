# The Triton kernels run on CPU tensors under the interpreter, which must be switched on before triton is
# first imported; this file is imported by pytest before any test module.
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
