"""Greedy picks of the sampler (finite flags and argmax of logits rows): Triton and reference."""
