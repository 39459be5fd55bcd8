"""The math at the ground: the quantization grid, the zero-point solver, the parameter initializers and the
GPTQ/LDLQ/RTN solvers. Pure torch functions on tensors; no I/O, no models."""
