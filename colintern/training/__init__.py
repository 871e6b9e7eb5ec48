"""Training: run arguments, losses, the contrastive Trainer, hard-negative mining, export and the LR finder.

Imports `colintern.evaluation`, `colintern.model`, `colintern.data` and plumbing.
"""
