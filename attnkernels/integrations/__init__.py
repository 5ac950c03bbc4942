"""Backends for other projects. `attnkernels.integrations.transformers.register()` adds
`attn_implementation="attnkernels"` to Hugging Face transformers."""
