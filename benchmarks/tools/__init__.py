"""Measuring tools of the benchmarks (copied into the project from the team's shared tools; now ours).

traffic.py: global-memory bytes of Triton kernels, counted in the interpreter.
peakmem.py: peak live CPU-allocator bytes of a call, from the profiler's memory events.
interp_fixes.py: patches the Triton interpreter needs to run Liger-Kernel's kernels on the CPU.
"""
