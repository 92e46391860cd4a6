"""Routing (Algorithm 2): router features, the 3-layer MLP router, its training at export.

features.py  which h(x) (prefix | base | embeddings | auto), the library's shared prefix, shipped weights
router.py    the MLP, saved as router.safetensors + router.json
train.py     RouterBuilder: trains (or reuses RUN/router/<key>/) during `mergetool export`
backbone.py  backbone / head split and staged execution of BERT-like encoders
The runtime itself is mergetool/runtime.py.
"""
