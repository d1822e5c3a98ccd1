"""Layer 3, a run and what it leaves: setting up a run, training it end to end, the adapter files, the
model card, curves, the Hub, loading a run for prediction. Imports the engine and the contract."""
