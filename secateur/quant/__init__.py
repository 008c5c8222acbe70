"""Weight quantization: the grid, the solvers (GPTQ, RTN) and what a quantized linear keeps."""
