"""llama.cpp's importance-matrix file, from secateur's calibration statistics.

`llama-imatrix` stores, per weight matrix, the sum of x_j^2 over every calibration token that
reached the matrix's input (`NAME.in_sum2`, F32 [n_in]) and the token count (`NAME.counts`),
in a GGUF file with `general.type = imatrix` (tools/imatrix/imatrix.cpp). The same numbers
are the diagonal of the X^T X secateur gathers for GPTQ, so `llama-quantize --imatrix FILE`
can quantize with secateur's calibration, and the two tools' quantizers can be compared on
equal statistics.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from secateur.io import atomic_file


def write_imatrix(out: Path, means: dict[str, tuple[torch.Tensor, int]], dataset: str,
                  chunk_size: int, chunk_count: int) -> dict[str, Any]:
    """`means`: GGUF tensor name -> (mean x^2 per input column, tokens it was taken over)."""
    import gguf

    with atomic_file(Path(out)) as tmp:
        writer = gguf.GGUFWriter(tmp, arch="imatrix")
        writer.add_type("imatrix")
        writer.add_array("imatrix.datasets", [dataset])
        writer.add_uint32("imatrix.chunk_count", chunk_count)
        writer.add_uint32("imatrix.chunk_size", chunk_size)
        for name, (mean, tokens) in sorted(means.items()):
            sums = (mean.detach().double() * tokens).float().numpy().reshape(1, -1)
            writer.add_tensor(f"{name}.in_sum2", np.ascontiguousarray(sums))
            writer.add_tensor(f"{name}.counts", np.array([[float(tokens)]], dtype=np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return {"out": str(out), "tensors": len(means), "dataset": dataset,
            "chunk_size": chunk_size, "chunk_count": chunk_count}


def model_imatrix(model: torch.nn.Module) -> dict[str, tuple[torch.Tensor, int]]:
    """GGUF tensor name -> (mean x^2, tokens) for every matrix a gguf quantize step rounded
    with calibration data (`secateur.methods.gguf`)."""
    from secateur.formats.gguf import hf_weight_names, read_gguf_layout
    from secateur.quant.ggml import ggml_states

    names = {hf: g for g, hf in hf_weight_names(read_gguf_layout(model, "model")).items()}
    return {names[hf]: (s.imatrix, s.imatrix_tokens) for hf, s in ggml_states(model).items()
            if s.imatrix is not None and hf in names}
