"""What acts on a transformer for one run: the Feature protocol (api), the ordered registry, and each feature
(LoRA, compile, step caching, attention). Other folders import the modules directly."""
