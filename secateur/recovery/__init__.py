"""Recovery after pruning: LoRA on the LM loss (`lora`) and knowledge distillation from the
dense teacher (`distill`), both on one training loop that keeps pruning masks exactly zero.

Importing `secateur.recovery.lora`, `secateur.recovery.distill` and `secateur.recovery.dwq`
registers the `lora`, `distill` and `dwq` (quantization scales learnt from the teacher)
recover steps.
"""
