"""PyTorch-side helpers: model wrappers for export, (later) training, distillation, pruning."""
