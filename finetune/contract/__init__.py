"""Layer 1, the contract: what a plugin implements (the hooks, :class:`Task`) and what it may use (the
recipe schema, backbones, tables, batching, labels, layers, callbacks). Imports nothing above it."""
