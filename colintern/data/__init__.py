"""Data: page decoding, query-page pairs and their collator, augmentation, SynthDocs, and users' own documents.

Imports only colintern's plumbing (`colintern.utils`, `colintern.hub`, `colintern.cli`).
"""
