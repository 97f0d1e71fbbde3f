"""Offline distillation (issue 20): teacher targets generated once and stored, training from them without
the teacher. topk: the stored per-position targets (top-k log-probs plus the tail mass) and the losses
against them."""
