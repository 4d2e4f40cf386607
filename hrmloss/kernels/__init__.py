"""The Triton kernels (the "triton" backend): one family of three passes over a row's vocabulary and its
launcher (launch.py). `@triton.jit` code only in the kernel files; imported only when the backend is used."""
