"""Pipeline stages: one module per stage, each a function of (params, input paths) → outputs."""
