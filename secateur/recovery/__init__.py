"""Recovery after pruning: LoRA fine-tuning (peft), merged back into the weights."""
