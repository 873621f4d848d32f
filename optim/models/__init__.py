"""FLUX.2 files and what is read from them: checkpoint headers, layouts, configs, loading, precision, estimates,
text encoding, and tiny random-weight parts for the demo and the bench. Other folders import the modules directly."""
