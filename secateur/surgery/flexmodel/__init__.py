"""secateur's own model class for pruned models, in a file that travels with the weights.

`modeling_secateur_flex.py` holds the generic class (model_type 'secateur') for every family:
the family's stock transformers class, reshaped from a per-model spec in the config (per-layer
widths, removed attention/MLP branches). secateur converts models into it with
`secateur.surgery.flex.to_flex`.

That file imports only torch and transformers, because it is copied next to saved models.
"""

from secateur.surgery.flexmodel.modeling_secateur_flex import flex_classes

__all__ = ["flex_classes"]
