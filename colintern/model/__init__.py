"""The retriever: ColIntern3_5 (InternVL3.5 + projection head), its processor, MaxSim scoring, batched encoding,
loading (Hub, local, adapters), checkpoint inspection and the embedded tiny checkpoint.

Imports `colintern.data` and plumbing, nothing above.
"""
