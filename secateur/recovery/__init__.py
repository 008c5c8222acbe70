"""Recovery after pruning: LoRA on the LM loss (`lora`) and knowledge distillation from the
dense teacher (`distill`), both on one training loop that keeps pruning masks exactly zero.

Importing `secateur.recovery.lora` and `secateur.recovery.distill` registers the `lora` and
`distill` recover steps.
"""
