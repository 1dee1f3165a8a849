"""Loss terms, one concept per module; the trainer weights and sums them."""
