"""TensorRT plugins: INT4 group-wise GEMM and attention with an in-place KV cache.

- ops.py: the ops' contract (inputs, layouts, attributes);
- reference.py / reference_backend.py: NumPy references, and the plugin graph run on a CPU;
- library.py: builds the plugin library from csrc/ with nvcc (on the device, or here to check);
- csrc/: the CUDA kernels, the IPluginV3 glue and a no-GPU contract harness.
"""
