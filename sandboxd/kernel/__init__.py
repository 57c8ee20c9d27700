"""The one seam to the kernel: its constants and calls (ctypes lives only here), and the seccomp filter assembler."""
