"""secateur's own model classes: Llama-family layers with per-layer widths and sub-blocks.

`configuration_secateur.py` and `modeling_secateur.py` import only torch and transformers,
because they travel with saved models (see `modeling_secateur`'s docstring for usage).
"""

from secateur.surgery.flexmodel.configuration_secateur import SecateurLlamaConfig
from secateur.surgery.flexmodel.modeling_secateur import (
    LayerSpec,
    SecateurLlamaForCausalLM,
    convert_llama,
)

__all__ = ["LayerSpec", "SecateurLlamaConfig", "SecateurLlamaForCausalLM", "convert_llama"]
