"""Every on-disk format secateur reads or writes, behind one boundary above the model code.

- `loader`: `load(name_or_path)` picks the reader for whatever is there;
- `hf`: a Hugging Face folder (safetensors), secateur's own classes and `auto_map` where
  per-layer shapes differ (`registry` registers those classes with the Auto classes);
- `compact`: masked weights as a bitmask plus the kept values;
- `packed_save`, `packed_load`, `packed_runtime`: compressed-tensors pack-quantized and
  int-quantized, written, read back onto the grids, or run on the CPU integer kernels;
- `streaming`: safetensors read and written one decoder layer at a time;
- `masks`, `ggml_blocks`: the pruning masks and llama.cpp block buffers that no saved model
  holds, written beside the weights of a checkpoint secateur reads back (a recipe's step);
- `save`: which format an output is saved in (`output_format`), and `save_output`, which
  writes it: the one rule every command and recipe saves through;
- `export`: `export`/`export_model`, a model written for another runtime: `gguf` (llama.cpp,
  `gguf_gemma3` for Gemma 3) and `nemotron_nas` (DeciLM for vLLM, with the `remote/` code that
  travels with it), both reading the model as `llama_layout` sees it; `imatrix` writes
  llama.cpp's importance-matrix file.

The model code (`models`, `quant`, `surgery`, `runtime`) never imports this package.
"""
