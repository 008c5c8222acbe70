"""secateur's own model classes for pruned models, each in a file that travels with the weights.

- `modeling_secateur_flex.py`: the generic class (model_type 'secateur') for every family:
  the family's stock transformers class, reshaped from a per-model spec in the config
  (per-layer widths, removed attention/MLP branches). secateur converts models into it with
  `secateur.surgery.flex.to_flex`.
- `configuration_secateur.py` / `modeling_secateur.py`: the earlier Llama-only class
  (`secateur_llama`), kept so that models users saved with it still load and can be pruned
  further.

These files import only torch and transformers, because they are copied next to saved models.
"""

from secateur.surgery.flexmodel.configuration_secateur import SecateurLlamaConfig
from secateur.surgery.flexmodel.modeling_secateur import (
    LayerSpec,
    SecateurLlamaForCausalLM,
    convert_llama,
)
from secateur.surgery.flexmodel.modeling_secateur_flex import flex_classes

__all__ = ["LayerSpec", "SecateurLlamaConfig", "SecateurLlamaForCausalLM", "convert_llama",
           "flex_classes"]
