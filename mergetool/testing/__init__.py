"""Tiny offline model zoos and data for the tests, the quick example and the benchmarks.

toy.py        BERT-family zoos (random or trained on synthetic data), tokenizers, recipes
toy_kinds.py  GPT-2, Llama, T5, ViT and CLIP zoos, images and choice data
Importing them changes no global state (logging included); the package itself never imports them.
"""
