"""Registers secateur's own config/model classes with the Auto classes.

With this imported, `AutoModelForCausalLM.from_pretrained(dir)` loads a model saved as
secateur's generic class (model_type 'secateur', any family) from secateur's copy of the code;
without secateur, the copy saved in the directory loads through `trust_remote_code=True`.
"""

from __future__ import annotations

from typing import Any

from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedConfig

from secateur.models.base import FLEX_MODEL_TYPE, supported_model_types
from secateur.surgery.flexmodel.modeling_secateur_flex import flex_classes


class FlexConfigDispatch(PreTrainedConfig):
    """Stands for model_type 'secateur' in AutoConfig: hands the dict to the config class of
    the family named by `base_model_type`."""

    model_type = FLEX_MODEL_TYPE

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs: Any) -> Any:
        return flex_classes(config_dict["base_model_type"])[0].from_dict(config_dict, **kwargs)


AutoConfig.register(FLEX_MODEL_TYPE, FlexConfigDispatch, exist_ok=True)
for _family in supported_model_types():
    if _family != FLEX_MODEL_TYPE:
        AutoModelForCausalLM.register(*flex_classes(_family), exist_ok=True)
