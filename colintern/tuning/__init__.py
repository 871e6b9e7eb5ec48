"""Tuning: architecture analysis, the memory model, the hyperparameter advisor, ablations and the Optuna search.

Imports `colintern.training` and everything below it.
"""
