"""Routing (Algorithm 2): router features, the 3-layer MLP router, routed evaluation.

features.py  which h(x) (prefix | base | embeddings | auto), the library's shared prefix, shipped weights
router.py    the MLP, saved as router.safetensors + router.json
backbone.py  backbone / head split of BERT-like classifiers (the staged forward is evaluation/stages.py)
evaluate.py  routed and oracle-routed scores of a library
The router is trained at export by mergetool.pipeline.router_training; the runtime is mergetool.inference.
"""
