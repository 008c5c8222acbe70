"""Registers secateur's own config/model classes with the Auto classes.

With this imported, `AutoModelForCausalLM.from_pretrained(dir)` loads a saved
`secateur_llama` model from secateur's copy of the code; without secateur, the copy saved in the
directory loads through `trust_remote_code=True`.
"""

from transformers import AutoConfig, AutoModelForCausalLM

from secateur.surgery.flexmodel import SecateurLlamaConfig, SecateurLlamaForCausalLM

AutoConfig.register(SecateurLlamaConfig.model_type, SecateurLlamaConfig, exist_ok=True)
AutoModelForCausalLM.register(SecateurLlamaConfig, SecateurLlamaForCausalLM, exist_ok=True)
