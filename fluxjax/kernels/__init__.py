"""Native kernels: the CPU attention kernel (C++, compiled on first use) and its build."""
