"""Tools that run a model themselves, outside a run: concept probes (`probe`), logit effects
(`logits`), synthetic maximally-activating inputs (`synth`) and SAE training (`train`)."""
